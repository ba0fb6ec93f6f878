"""A run's records in Weights & Biases (`[train] loggers = ["tensorboard", "wandb"]`), beside metrics.jsonl.

The wandb run gets the resolved config, every metrics record as it is written (numbers flattened as
`<type>/<a>/<b>`: losses, learning rates, recalls, per-level updates, quantisation …), the PNG plots each
time they are drawn, and the best checkpoint's validation recalls in its summary. Its id is kept in the run
folder (`wandb-id.txt`), so `mm train --resume` continues the same wandb run. Only rank 0 logs (the
`RunLog` of the other ranks is disabled). `WANDB_MODE=offline` needs no network and no login; what it
wrote is synced later with `wandb sync RUN/wandb/offline-run-*`. Credentials are wandb's own (`wandb login`,
`WANDB_API_KEY`): trimodal never reads, writes or prints them.

Missing wandb, or a missing login when online, is one clear line before training starts; with
`train.wandb_optional = true` it is a warning and training goes on without wandb.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from trimodal.errors import ConfigError
from trimodal.training.optimization import flatten

ID_FILE = "wandb-id.txt"
OFFLINE_MODES = ("offline", "disabled", "dryrun")


class WandbUnavailable(ConfigError):
    """wandb cannot log (not installed, not logged in): the message says what to do."""


def check_available() -> None:
    """A WandbUnavailable unless wandb is installed and, when it is to log online, logged in."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise WandbUnavailable("train.loggers has wandb, but the wandb package is not installed (pip install wandb); "
                               "or set train.wandb_optional = true to train without it") from None
    if os.environ.get("WANDB_MODE", "").lower() in OFFLINE_MODES:
        return
    if not (os.environ.get("WANDB_API_KEY") or _stored_key()):
        raise WandbUnavailable("train.loggers has wandb, but wandb is not logged in: run `wandb login` (or set "
                               "WANDB_API_KEY), or WANDB_MODE=offline to log locally and sync later; or set "
                               "train.wandb_optional = true to train without it")


def _stored_key() -> bool:
    """Whether `wandb login` left a key in the netrc file for wandb's host (whether, not what)."""
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbLog:
    """The wandb run of a run folder: `record`, `images`, `best`, `close`."""

    def __init__(self, run: Path, config: dict, project: str, entity: str):
        import wandb

        id_file = run / ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        self._wandb = wandb
        self._run = wandb.init(project=project, entity=entity or None, name=run.name, dir=str(run), id=run_id,
                               resume="allow", config=config,
                               settings=wandb.Settings(silent=True, console="off"))

    def record(self, record: dict) -> None:
        values = {f"{record.get('type', 'record')}/{name}": value for name, value in flatten(record).items()
                  if name not in ("step", "epoch")}
        values["epoch"] = record.get("epoch")
        self._run.log({k: v for k, v in values.items() if v is not None}, step=int(record.get("step", 0)))

    def images(self, paths: list[Path], step: int) -> None:
        if paths:
            self._run.log({f"plots/{Path(p).stem}": self._wandb.Image(str(p)) for p in paths}, step=step)

    def best(self, record: dict) -> None:
        """The best checkpoint's validation record, in the run's summary (`best/...`)."""
        for name, value in flatten(record).items():
            self._run.summary[f"best/{name}"] = value

    def close(self) -> None:
        self._run.finish()
