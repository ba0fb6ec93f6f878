"""The COCO code path end to end on CPU: mini-coco (coco2014 + SpokenCOCO layout) through every command."""

import json

import pytest


@pytest.mark.slow
def test_mini_coco_featurizes_trains_and_evaluates_with_the_1k_protocol(mm, mini_coco_shards, tmp_path):
    store, run = tmp_path / "features.zarr", tmp_path / "run"
    featurized = mm("featurize", mini_coco_shards, "--out", store, "--image", "open_clip:ViT-S-32", "--device", "cpu")
    assert featurized.exit_code == 0, featurized.output
    trained = mm("train", "configs/mmn-tiny.toml", "--shards", mini_coco_shards, "--features", store, "--out", run,
                 "train.epochs=12", 'train.device="cpu"')
    assert trained.exit_code == 0, trained.output
    evaluated = mm("eval", run, "--split", "test", "--folds", "5")
    assert evaluated.exit_code == 0, evaluated.output
    result = json.loads((run / "eval-test.json").read_text())
    assert (result["images"], result["folds"]["images"]) == (60, [12] * 5)
    assert result["captions"] == result["utterances"] > 300  # five to seven captions per image, all spoken
    assert len(result["directions"]) == len(result["directions_1k"]) == 6
    # Captions, utterances and images are joined correctly only if every direction learns something.
    for name, metrics in result["directions"].items():
        assert metrics["R@10"] >= 2 * metrics["chance@10"], f"{name}: {metrics}"
