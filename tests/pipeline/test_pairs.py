"""Our shards in open_clip_train: `mm pairs` streams a shard as one (image, caption) sample per caption through
webdataset's `pipe:` URLs, and one webdataset version satisfies img2dataset, open_clip's training code and
CLIP_benchmark."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from trimodal.pipeline.read.pairs import caption_pairs, write_pairs
from trimodal.pipeline.read.shards import iter_samples

MM = Path(sys.executable).parent / "mm"


def test_every_caption_becomes_one_sample_with_its_image(mini_shards):
    shard = mini_shards / "test-000000.tar"
    samples = dict(iter_samples(shard, {"jpg", "txt"}))
    pairs = list(caption_pairs(shard))
    assert len(pairs) == sum(len(m["txt"].decode().splitlines()) for m in samples.values())
    for key, members in pairs:
        described = json.loads(members["json"])
        image = samples[described["key"]]
        assert key == f"{described['key']}_{described['caption']}" and "." not in key
        assert members["jpg"] == image["jpg"]
        assert members["txt"].decode() == image["txt"].decode().splitlines()[described["caption"]]
        assert "\n" not in members["txt"].decode()


def test_the_stream_is_a_tar_webdataset_groups_into_those_samples(mini_shards, tmp_path):
    import webdataset as wds

    buffer = io.BytesIO()
    count = write_pairs(mini_shards / "val-000000.tar", buffer)
    with tarfile.open(fileobj=io.BytesIO(buffer.getvalue())) as tar:
        assert len(tar.getnames()) == 3 * count.pairs
    stream = tmp_path / "pairs.tar"
    stream.write_bytes(buffer.getvalue())
    samples = list(wds.WebDataset(str(stream), shardshuffle=False).decode())
    assert len(samples) == count.pairs == 5 * count.images
    assert all(isinstance(s["txt"], str) and "\n" not in s["txt"] and s["jpg"] is not None for s in samples)


def test_one_webdataset_satisfies_img2dataset_open_clip_training_and_clip_benchmark():
    installed = metadata.version("webdataset")
    for package, extra in (("img2dataset", None), ("open_clip_torch", "training"), ("clip-benchmark", None)):
        requirements = [Requirement(r) for r in metadata.requires(package) or []]
        wanted = [r for r in requirements if r.name == "webdataset"
                  and (r.marker is None or r.marker.evaluate({"extra": extra or ""}))]
        assert wanted, (package, extra)
        assert all(r.specifier.contains(installed, prereleases=True) for r in wanted), (package, installed, wanted)


@pytest.mark.slow
def test_open_clip_train_trains_on_our_shards_through_mm_pairs(mini_shards, tmp_path):
    train = json.loads((mini_shards / "index.json").read_text())["splits"]["train"]["shards"]
    last = len(train) - 1
    url = f"pipe:{MM} pairs {mini_shards}/train-{{000000..{last:06d}}}.tar"
    logs = tmp_path / "logs"
    done = subprocess.run(
        [sys.executable, "-m", "open_clip_train.main", "--train-data", url, "--dataset-type", "webdataset",
         "--train-num-samples", "16", "--batch-size", "8", "--epochs", "1", "--workers", "1", "--model", "ViT-S-32",
         "--lr", "1e-4", "--warmup", "1", "--precision", "fp32", "--device", "cpu", "--logs", str(logs),
         "--name", "pairs", "--zeroshot-frequency", "0", "--val-frequency", "0", "--seed", "0",
         "--log-every-n-steps", "1", "--report-to", ""],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, "TORCHDYNAMO_VERBOSE": "0"})
    log = (logs / "pairs" / "out.log").read_text() if (logs / "pairs" / "out.log").is_file() else ""
    assert done.returncode == 0, (done.stderr[-3000:], log[-2000:])
    assert "Train Epoch: 0 [16/16 (100%)]" in log, log[-2000:]
    assert (logs / "pairs" / "checkpoints" / "epoch_1.pt").is_file()
