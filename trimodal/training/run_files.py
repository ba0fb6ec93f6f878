"""What a run folder holds besides checkpoints: `config.resolved.toml`, `metrics.jsonl` and TensorBoard
events. Under torchrun only rank 0 writes them; the other ranks get a `RunLog` that writes nothing."""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

from trimodal import __version__
from trimodal.atomic import write_jsonl
from trimodal.training.config import RunConfig, dump_toml
from trimodal.training.optimization import flatten


class RunLog:
    """metrics.jsonl (one JSON record per line), TensorBoard scalars (`tensorboard`) and a wandb run (`wandb`,
    a `trimodal.training.wandb_log.WandbLog`); `enabled=False` writes nothing."""

    def __init__(self, run: Path, enabled: bool = True, *, tensorboard: bool = True, wandb=None):
        self.enabled = enabled
        self._file = self._writer = None
        self._wandb = wandb if enabled else None
        if enabled:
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(run / "tensorboard"))
            self._file = open(run / "metrics.jsonl", "a", encoding="utf-8")

    def record(self, record: dict) -> None:
        if self.enabled:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
            if self._wandb is not None:
                self._wandb.record(record)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self._writer is not None:
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, step)

    def images(self, paths: list[Path], step: int) -> None:
        """The run's plots, just drawn (wandb: as images)."""
        if self._wandb is not None:
            self._wandb.images(paths, step)

    def best(self, record: dict) -> None:
        """The validation record of the checkpoint now best (wandb: the run's summary)."""
        if self._wandb is not None:
            self._wandb.best(record)

    def train_record(self, record: dict) -> None:
        """A "train" record, and its numbers as TensorBoard scalars (nested ones as `train/<a>/<b>`)."""
        self.record(record)
        step = record["step"]
        self.scalars({"train/loss": record["loss"], "train/lr": record["lr"],
                      "train/samples_per_s": record["samples_per_s"],
                      **{f"train/loss/{name}": value for name, value in record["losses"].items()},
                      **{f"train/{tag}": value for tag, value in flatten(
                          {k: v for k, v in record.items() if isinstance(v, dict) and k != "losses"}).items()}},
                     step)

    def val_record(self, record: dict) -> None:
        self.record(record)
        if record.get("directions"):
            self.scalars({**{f"val/{direction}/R@10": values["R@10"] for direction, values in record["directions"].items()},
                          "val/mean_recall": record["mean_recall"]}, record["epoch"])

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._writer is not None:
                self._writer.close()
            if self._wandb is not None:
                self._wandb.close()


STEP_RECORDS = ("train", "attention")  # written during an epoch, at a step: kept up to the checkpoint's step


def truncate_metrics(path: Path, epoch: int, step: int, epoch_done: bool) -> None:
    """Drop what an interrupted run logged after the checkpoint we resume from (at `step` of `epoch`, its end
    when `epoch_done`), a line cut short by a kill included."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["step"] <= step and (record["type"] in STEP_RECORDS or record["epoch"] < epoch or epoch_done):
            kept.append(record)
    write_jsonl(path, kept)


def versions() -> dict:
    found = {"trimodal": __version__}
    for package in ("torch", "torchaudio", "open_clip_torch", "zarr", "webdataset", "numpy"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def git_commit() -> str:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=5)
        return result.stdout.strip() if result.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def write_resolved_config(run: Path, config: RunConfig, model_settings: dict, train: dict, data: dict,
                          facts: dict) -> None:
    """`config.resolved.toml`: the model's settings (the store's sizes included), the [train] settings as
    resolved for this run (`train`), where the data is, and `facts` about the run (parameters, device,
    world size, batch per rank, …) with the versions and commit it ran."""
    sections = {
        "model": {"name": config.model_name, **model_settings},
        "train": {**asdict(config.train), **train},
        "data": data,
        "run": {**facts, "git_commit": git_commit(), **versions()},
    }
    (run / "config.resolved.toml").write_text(dump_toml(sections), encoding="utf-8")
