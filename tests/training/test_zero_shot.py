"""`mm eval --model open_clip:<model>`: a pretrained open_clip model (here random-init weights in a file) scored
zero-shot with `mm eval`'s protocol, checked against CLIP_benchmark's own command on `mm export-benchmark`'s
layout of the same split."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from trimodal.cli.main import main
from trimodal.pipeline.read.index import read_index

MODEL = "ViT-S-32"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The random-init ViT-S-32 `mm` draws, as a weights file (what a user passes for pretrained weights)."""
    import open_clip
    from safetensors.torch import save_file

    from trimodal.features.image import seeded

    model = seeded(lambda: open_clip.create_model(MODEL, pretrained=None))
    path = tmp_path_factory.mktemp("weights") / f"{MODEL}.safetensors"
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def zero_shot(mini_shards, weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero-shot") / "clip"
    assert main(["eval", "--model", f"open_clip:{MODEL}:{weights}", "--shards", str(mini_shards), "--split", "test",
                 "--folds", "2", "--out", str(out), "--device", "cpu"]) == 0
    return json.loads((out / "eval-test.json").read_text())


def test_the_result_has_a_runs_layout_with_folds(zero_shot, mini_shards):
    test = read_index(mini_shards)["splits"]["test"]
    assert zero_shot["model"].startswith(f"open_clip:{MODEL}:") and zero_shot["zero_shot"]
    assert not zero_shot["random_init"]
    assert zero_shot["images"] == sum(s["samples"] for s in test["shards"])
    assert zero_shot["captions"] == sum(s["captions"] for s in test["shards"])
    assert set(zero_shot["directions"]) == {"image->text", "text->image"}
    for metrics in zero_shot["directions"].values():
        assert set(metrics) == {"R@1", "R@5", "R@10", "median_rank", "chance@10"}
    assert len(zero_shot["directions_folds"]) == 2 and set(zero_shot["directions_1k"]) == set(zero_shot["directions"])
    assert zero_shot["from_store"] == []


def test_clip_benchmark_on_our_layout_gives_the_same_recalls(zero_shot, weights, mini_shards, tmp_path):
    """CLIP_benchmark's own command, on `mm export-benchmark`'s links to our test shard, with the same weights."""
    shards = tmp_path / "shards"
    shutil.copytree(mini_shards, shards)
    assert main(["export-benchmark", str(shards)]) == 0
    output = tmp_path / "clip_benchmark.json"
    done = subprocess.run([sys.executable, "-m", "clip_benchmark.cli", "eval", "--dataset", "wds/mini", "--dataset_root",
                           str(shards / "clip_benchmark"), "--task", "zeroshot_retrieval", "--model", MODEL,
                           "--pretrained", str(weights), "--recall_k", "1", "5", "10", "--no_amp", "--num_workers", "0",
                           "--output", str(output)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = json.loads(output.read_text())["metrics"]
    ours = zero_shot["directions"]
    for k in (1, 5, 10):  # their image retrieval is text->image, their text retrieval image->text
        assert ours["text->image"][f"R@{k}"] == pytest.approx(theirs[f"image_retrieval_recall@{k}"], abs=1e-6), k
        assert ours["image->text"][f"R@{k}"] == pytest.approx(theirs[f"text_retrieval_recall@{k}"], abs=1e-6), k


def test_the_store_is_used_when_featurize_ran_the_same_tower(mini_shards, mini_cman_features, tmp_path, monkeypatch):
    """cman's store ran ViT-B-32's image and text towers (whole, with states cached on the way)."""
    from trimodal.training import zero_shot

    store = mini_cman_features
    monkeypatch.setattr(zero_shot, "_encode_images", lambda *a, **k: pytest.fail("images encoded again"))
    monkeypatch.setattr(zero_shot, "_encode_captions", lambda *a, **k: pytest.fail("captions encoded again"))
    assert main(["eval", "--model", "open_clip:ViT-B-32", "--shards", str(mini_shards), "--features", str(store),
                 "--out", str(tmp_path), "--device", "cpu"]) == 0
    result = json.loads((tmp_path / "eval-test.json").read_text())
    assert result["from_store"] == ["image", "text"]
    # Another tower's store is not used for this one.
    monkeypatch.undo()
    assert main(["eval", "--model", f"open_clip:{MODEL}", "--shards", str(mini_shards), "--features", str(store),
                 "--split", "val", "--out", str(tmp_path), "--device", "cpu", "--batch-size", "128"]) == 0
    assert json.loads((tmp_path / "eval-val.json").read_text())["from_store"] == []


def test_bad_zero_shot_options_are_one_line(mini_shards, tmp_path, capsys):
    for argv, message in [
        (["eval", "--model", "timm:vit_small", "--shards", str(mini_shards), "--out", str(tmp_path)], "is not open_clip:"),
        (["eval", "--model", "open_clip:NoSuchNet", "--shards", str(mini_shards), "--out", str(tmp_path)],
         "unknown open_clip model"),
        (["eval", "--model", f"open_clip:{MODEL}", "--out", str(tmp_path)], "--model needs --shards"),
        (["eval", "--model", f"open_clip:{MODEL}", "--shards", str(mini_shards), "--out", str(tmp_path), "--ttt"],
         "--ttt"),
        (["eval", "--model", f"open_clip:{MODEL}", "--shards", str(mini_shards), "--split", "nope", "--out",
          str(tmp_path)], "has no split 'nope'"),
        (["eval", "--model", f"open_clip:{MODEL}", "--shards", str(tmp_path / "none"), "--out", str(tmp_path)], "none"),
        (["eval"], "give a run folder"),
    ]:
        assert main(argv) != 0, argv
        error = capsys.readouterr().err
        assert message in error and "Traceback" not in error, (argv, error)
    assert not (tmp_path / "eval-test.json").exists()
