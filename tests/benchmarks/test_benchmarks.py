"""Every script in benchmarks/ still runs to its result, at a tiny size: a smoke test, not a timing."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
NUMBER = r"-?[\d,.]+"  # a rate at a tiny size may even come out negative (a difference of two noisy times)


def run_benchmark(name: str, *args) -> str:
    """`python benchmarks/<name>.py ARGS…` from the repository root, as docs/benchmarks.md runs it; its stdout."""
    result = subprocess.run([sys.executable, f"benchmarks/{name}.py", *map(str, args)], cwd=REPOSITORY,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


def assert_line(pattern: str, output: str) -> None:
    assert re.search(pattern, output, re.MULTILINE), f"no line matches {pattern!r} in:\n{output}"


def assert_steps_succeeded(steps: list[str], output: str) -> None:
    """Each step is a row of the script's table, its last column the step's exit status."""
    for step in steps:
        assert_line(rf"^\| {re.escape(step)} \|.* \| 0 \|$", output)


@pytest.mark.parametrize("layout", ["flickr8k", "coco2014"])
def test_shard_benchmark_prints_its_ratio_to_tar(layout, tmp_path):
    output = run_benchmark("shard", "--layout", layout, "--images", 10, "--runs", 1, "--workdir", tmp_path)
    assert_line(rf"^shard: {NUMBER} MB/s vs tar {NUMBER} MB/s, ratio {NUMBER}$", output)


def test_attention_benchmark_prints_the_probes_cost(micro_shards, featurized_micro):
    output = run_benchmark("attention", "--shards", micro_shards, "--features", featurized_micro(), "--steps", 2,
                           "--every", 1, "--device", "cpu")
    assert_line(rf"^mmn: {NUMBER} ms a step, probe {NUMBER} ms, every 1 steps: {NUMBER}% of a step", output)


def test_featurize_benchmark_prints_both_end_to_end_ratios(micro_shards):
    output = run_benchmark("featurize", "--shards", micro_shards, "--device", "cpu")
    assert_line(rf"^image: end-to-end / model-only = {NUMBER}%$", output)
    assert_line(rf"^mel: end-to-end / model-only = {NUMBER}%", output)


def test_loader_benchmark_prints_its_ratio_to_the_naive_dataset(mini_shards, mini_features):
    output = run_benchmark("loader", "--shards", mini_shards, "--features", mini_features, "--split", "val",
                           "--runs", 1)
    assert_line(rf"^loader: {NUMBER} samples/s vs naive {NUMBER} samples/s, ratio {NUMBER}$", output)


def test_coco_scale_benchmark_measures_every_step(tmp_path):
    output = run_benchmark("coco_scale", "--images", 200, "--workdir", tmp_path)
    assert "generated 200 images, 1,000 captions, 981 utterances" in output
    assert_steps_succeeded(["import only (baseline)", "parse + join (scan)", "mm validate coco2014",
                            "mm shard coco2014"], output)


def test_babylm_scale_benchmark_measures_every_step(tmp_path):
    output = run_benchmark("babylm_scale", "--rows", 200, "--skip-tokens", "--workdir", tmp_path)
    assert_steps_succeeded(["import only (baseline)", "mm validate babylm-mm", "mm shard babylm-mm",
                            "mm featurize (npy import only)"], output)


def test_cc3m_download_benchmark_downloads_retries_and_finds_the_rerun_complete(tmp_path):
    # 20 train URLs hold every kind (404, not an image, slow); the baseline (img2dataset started afresh for
    # each split) would double the time, so it is left out.
    output = run_benchmark("cc3m_download", "--rows", 20, "--val-rows", 10, "--processes", 1, "--threads", 4,
                           "--samples-per-shard", 10, "--no-baseline", "--workdir", tmp_path)
    assert_line(rf"^mm download cc3m \(TSVs fetched and verified, then img2dataset\): {NUMBER} s, {NUMBER} URLs/s$",
                output)
    assert_line(rf"^mm download cc3m --retry-failed \(all but the 404s fixed\): {NUMBER} s, {NUMBER} URLs/s$", output)
    assert_line(r"^rerun of the complete download: .*already complete: True$", output)


def test_train_benchmark_prints_its_ratio_and_the_scaling_over_two_ranks(mini_shards, mini_features):
    output = run_benchmark("train", "--config", "configs/mmn-tiny.toml", "--shards", mini_shards, "--features",
                           mini_features, "--epochs", 1, "--steps", 2, "--nproc", 2, "--device", "cpu",
                           "train.num_workers=0", "train.max_steps=2")
    assert_line(rf"^train: {NUMBER} steps/s vs model-only {NUMBER} steps/s, ratio {NUMBER}$", output)
    assert_line(rf"^ranks: 1 rank {NUMBER} samples/s, 2 ranks {NUMBER} samples/s, scaling efficiency {NUMBER}$", output)


def test_stop_benchmark_prints_its_ratio(mini_shards, mini_features, tmp_path):
    # One run, signalled in the first epoch (batch 32: its 3rd of 6 steps), so that it stays short.
    output = run_benchmark("stop", "--shards", mini_shards, "--features", mini_features, "--workdir", tmp_path,
                           "--runs", 1, "--after-epochs", 0, "--batch-size", 32)
    assert_line(r"^\| 1 \| step \d+, batch [1-5]/6 of epoch 1 \|.* \| 75 \|", output)
    assert_line(rf"^stop: signal->checkpoint p50 {NUMBER} s, signal->exit p50 {NUMBER} s; one step p50 {NUMBER} s; "
                rf"ratio checkpoint/step = {NUMBER}$", output)


def test_object_storage_benchmark_prints_its_ratio(mini_shards, mini_features, tmp_path):
    pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install 'moto[server]')")
    # One run of one epoch each, without the tar-fallback rows (they need a second featurize).
    output = run_benchmark("object_storage", "--shards", mini_shards, "--features", mini_features, "--workdir",
                           tmp_path, "--runs", 1, "--epochs", 1, "--no-tar-fallback")
    assert_line(rf"^\| the store \(image, tokens, log-mels\) \| s3 \|.* \| 192 \| {NUMBER} \| {NUMBER} \|$", output)
    assert_line(rf"^\| train.epochs=1, train.num_workers=1 \| s3 \|.* \| 192 \| {NUMBER} \| {NUMBER} \| {NUMBER} \|$",
                output)
    assert_line(rf"^object storage: s3 / local = {NUMBER} \(data path\), {NUMBER} \(mm train end to end\)$", output)
    assert_line(r"^secret: in no output of mm train and no file of its run folders", output)
