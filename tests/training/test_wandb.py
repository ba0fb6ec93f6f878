"""`[train] loggers = ["tensorboard", "wandb"]`: with WANDB_MODE=offline, the wandb run's own file holds the
resolved config, every metrics record, the plots and the best checkpoint's recalls; a missing wandb or
login is one line, and training goes on without it only when train.wandb_optional says so."""

from __future__ import annotations

import json
import struct
import sys

import pytest

from trimodal.cli.main import main
from trimodal.training.config import featurize_line, shipped_config

CONFIG = shipped_config("mmn-tiny")
QUICK = ["train.epochs=2", "train.batch_size=4", "train.num_workers=0", "train.log_every=1", "train.eval_batch_size=8",
         'train.device="cpu"', "model.layers=1", "model.model_dim=32", "model.latent_dim=16"]
WANDB = 'train.loggers=["tensorboard", "wandb"]'


def _records(path) -> list:
    """The protobuf records of a .wandb file (LevelDB's log format: 32 KiB blocks of checksummed chunks,
    after wandb's 7-byte header)."""
    from wandb.proto import wandb_internal_pb2

    data, records, pending, position = path.read_bytes(), [], b"", 7
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        if left < 7:
            position += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0 and length == 0:
            break
        chunk, position = data[position + 7 : position + 7 + length], position + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


@pytest.fixture
def sources(micro_shards, featurized_micro):
    return micro_shards, featurized_micro(featurize_line(CONFIG))


def test_an_offline_wandb_run_holds_config_records_plots_and_the_best_recalls(sources, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    shards, store = sources
    run = tmp_path / "run"
    assert main(["train", str(CONFIG), "--shards", str(shards), "--features", str(store), "--out", str(run),
                 *QUICK, WANDB]) == 0
    (folder,) = (run / "wandb").glob("offline-run-*")
    records = _records(next(folder.glob("run-*.wandb")))
    history = [_items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update(_items(r.summary.update))
    (started,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = _items(started.config.update)
    config = {name: value.get("value", value) if isinstance(value, dict) else value for name, value in config.items()}
    assert config["model"]["name"] == "mmn" and config["train"]["batch_size"] == 4
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [m["step"] for m in metrics if m["type"] == "train"]
    assert [h["train/loss"] for h in history if "train/loss" in h] == \
        pytest.approx([m["loss"] for m in metrics if m["type"] == "train"])
    assert [h["_step"] for h in history if "train/loss" in h] == train_steps
    assert [h["val/mean_recall"] for h in history if "val/mean_recall" in h] == \
        pytest.approx([m["mean_recall"] for m in metrics if m["type"] == "val"])
    assert any(key.startswith("train/lr") for h in history for key in h)
    plots = {"/".join(key.split("/")[:2]) for h in history for key in h if key.startswith("plots/")}  # image parts
    assert plots and {f"plots/{p.stem}" for p in (run / "plots").glob("*.png")} <= plots
    best = max((m for m in metrics if m["type"] == "val"), key=lambda m: m["mean_recall"])
    assert summary["best/mean_recall"] == pytest.approx(best["mean_recall"])
    assert (run / "wandb-id.txt").read_text().strip() in folder.name


def test_without_wandb_the_run_stops_in_one_line_unless_wandb_is_optional(sources, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    shards, store = sources
    args = ["train", str(CONFIG), "--shards", str(shards), "--features", str(store), *QUICK, WANDB]
    assert main([*args, "--out", str(tmp_path / "a")]) != 0
    error = capsys.readouterr().err
    assert "wandb package is not installed" in error and "Traceback" not in error
    assert not (tmp_path / "a" / "checkpoints").exists()
    assert main([*args, "--out", str(tmp_path / "b"), "train.epochs=1", "train.wandb_optional=true"]) == 0
    printed = capsys.readouterr()
    assert "training without wandb" in printed.out + printed.err
    assert (tmp_path / "b" / "checkpoints" / "last.safetensors").is_file()


def test_online_without_a_login_is_one_line(sources, tmp_path, monkeypatch, capsys):
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    shards, store = sources
    assert main(["train", str(CONFIG), "--shards", str(shards), "--features", str(store), "--out",
                 str(tmp_path / "run"), *QUICK, WANDB]) != 0
    error = capsys.readouterr().err
    assert "wandb is not logged in" in error and "WANDB_MODE=offline" in error and "Traceback" not in error


def test_an_unknown_logger_is_a_config_error(sources, tmp_path, capsys):
    shards, store = sources
    assert main(["train", str(CONFIG), "--shards", str(shards), "--features", str(store), "--out",
                 str(tmp_path / "run"), *QUICK, 'train.loggers=["mlflow"]']) != 0
    assert "loggers must name some of tensorboard, wandb" in capsys.readouterr().err
