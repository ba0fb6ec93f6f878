import json

import pytest

from trimodal.cli.evaluate import folds_title

DIRECTIONS = ["image->text", "text->image", "image->audio", "audio->image", "text->audio", "audio->text"]


@pytest.fixture(scope="module")
def one_epoch_run(mini_shards, mini_features, tmp_path_factory):
    from trimodal.training.config import shipped_config
    from trimodal.training.trainer import train

    run = tmp_path_factory.mktemp("runs") / "one-epoch"
    train(shipped_config("mmn-tiny"), mini_shards, mini_features, run,
          overrides=["train.epochs=1", "train.num_workers=0", 'train.device="cpu"'])
    return run


def test_eval_with_five_folds_writes_and_prints_the_mean_over_folds(mm, one_epoch_run):
    evaluated = mm("eval", one_epoch_run, "--split", "test", "--folds", "5", "--device", "cpu")

    assert evaluated.exit_code == 0, evaluated.output
    assert "test, mean over 5 folds of 12 images" in evaluated.out
    written = json.loads((one_epoch_run / "eval-test.json").read_text())
    assert written["folds"] == {"count": 5, "images": [12] * 5}
    assert list(written["directions_1k"]) == DIRECTIONS and len(written["directions_folds"]) == 5
    for name, metrics in written["directions_1k"].items():
        assert metrics["R@1"] == pytest.approx(sum(fold[name]["R@1"] for fold in written["directions_folds"]) / 5)
        assert 0 <= metrics["R@1"] <= metrics["R@5"] <= metrics["R@10"] <= 1


def test_eval_with_more_folds_than_images_is_one_clear_error(mm, one_epoch_run):
    refused = mm("eval", one_epoch_run, "--split", "val", "--folds", "41", "--device", "cpu")

    assert refused.exit_code != 0 and "--folds must be between 2 and the split's 40 images (got 41)" in refused.output
    assert not (one_epoch_run / "eval-val.json").exists()


def test_the_title_shows_a_range_when_folds_differ_in_size():
    assert folds_title("test", [1000] * 5) == "test, mean over 5 folds of 1,000 images"
    assert folds_title("val", [3, 3, 2]) == "val, mean over 3 folds of 2–3 images"
