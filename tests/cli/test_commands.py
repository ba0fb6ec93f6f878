import json

from trimodal import __version__


def test_version(mm):
    result = mm("--version")
    assert result.exit_code == 0 and __version__ in result.out


def test_download_mini_twice_says_already_complete(mm, mini_copy):
    result = mm("download", "mini", "--root", mini_copy)
    assert result.exit_code == 0 and "already complete" in result.out


def test_validate_writes_the_report(mm, mini_copy, tmp_path):
    result = mm("validate", "mini", "--root", mini_copy, "--report", tmp_path / "report.json")
    assert result.exit_code == 0 and "ok" in result.out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] is True and report["counts"]["images_checked"] == 300 and report["problems"] == []


def test_validate_exits_1_and_names_the_bad_file(mm, mini_copy, tmp_path):
    image = next((mini_copy / "mini" / "Flicker8k_Dataset").glob("*.jpg"))
    image.write_bytes(image.read_bytes()[:300])
    result = mm("validate", "mini", "--root", mini_copy, "--report", tmp_path / "report.json")
    assert result.exit_code == 1 and "corrupt_image" in result.out and "failed" in result.out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] is False
    assert [p["file"] for p in report["problems"] if p["kind"] == "corrupt_image"] == [f"mini/Flicker8k_Dataset/{image.name}"]
    assert set(report["problems"][0]) >= {"kind", "file", "line", "detail"}


def test_shard_then_info_on_shards_and_on_the_raw_root(mm, mini_copy, tmp_path):
    out = tmp_path / "shards"
    result = mm("shard", "mini", "--root", mini_copy, "--out", out, "--workers", "2")
    assert result.exit_code == 0 and "train" in result.out
    info = mm("info", out, "--json")
    summary = json.loads(info.out)
    assert summary["kind"] == "shards" and summary["splits"]["test"]["samples"] == 60
    assert summary["splits"]["train"]["shards"] == 4 and summary["missing_or_changed_shards"] == []
    table = mm("info", out)
    assert table.exit_code == 0 and "utterances" in table.out
    raw = json.loads(mm("info", mini_copy, "--json").out)
    assert raw["kind"] == "raw" and raw["datasets"][0]["name"] == "mini" and raw["datasets"][0]["status"] == "complete"


def test_progress_is_plain_lines_when_not_a_tty(mm, mini_copy, tmp_path):
    result = mm("shard", "mini", "--root", mini_copy, "--out", tmp_path / "shards")
    assert "shard mini …" in result.err and "shard mini: done, 300 samples" in result.err
    assert "\r" not in result.err and "\x1b[" not in result.err


def test_featurize_train_eval_through_the_cli(mm, mini_shards, tmp_path):
    store = tmp_path / "features.zarr"
    result = mm("featurize", mini_shards, "--out", store, "--image", "open_clip:ViT-S-32", "--splits", "train,val",
                "--device", "cpu")
    assert result.exit_code == 0 and "RANDOM weights" in result.err and "1,200" in result.out
    again = mm("featurize", mini_shards, "--out", store, "--image", "open_clip:ViT-S-32", "--splits", "train,val",
               "--device", "cpu")
    assert again.exit_code == 0 and "0 / 5" in again.out
    run = tmp_path / "run"
    trained = mm("train", "configs/mmn-tiny.toml", "--shards", mini_shards, "--features", store, "--out", run,
                 "train.epochs=1", "train.num_workers=0", 'train.device="cpu"')
    assert trained.exit_code == 0, trained.output
    assert "parameters" in trained.out and "image->text" in trained.out
    evaluated = mm("eval", run, "--split", "val", "--ttt")
    assert evaluated.exit_code == 0 and "TTT" in evaluated.out and (run / "eval-val.json").is_file()


def test_train_without_a_validation_split(mm, mini_shards, tmp_path):
    store = tmp_path / "train-only.zarr"
    from trimodal.features.featurize import FeaturizeOptions, featurize

    featurize(mini_shards, store, FeaturizeOptions(device="cpu", image="open_clip:ViT-S-32", splits=("train",)))
    result = mm("train", "configs/mmn-tiny.toml", "--shards", mini_shards, "--features", store, "--out", tmp_path / "run",
                "train.epochs=1", "train.num_workers=0")
    assert result.exit_code == 0, result.output
    assert "no validation split" in result.out and (tmp_path / "run" / "checkpoints" / "best.safetensors").is_file()
