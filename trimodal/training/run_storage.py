"""A run folder on local disk or in object storage (`--out s3://bucket/runs/x`).

Training writes many small files often (metrics lines, TensorBoard events, plots, checkpoints) and renames
them into place, which object storage cannot do. So a run in object storage is worked on in a local copy
(`$TRIMODAL_CACHE/runs/…`, default `~/.cache/trimodal/runs/…`) and published after every checkpoint and at
the end: each changed file is uploaded whole (an object appears only when its upload completes), the
checkpoint's commit file `checkpoints/last.state.pt` last, and files the run removed (pruned step
checkpoints) are deleted only after that. So the bucket always holds a whole checkpoint to resume from,
as the local folder does. `--resume` downloads the run into a fresh local copy first.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from trimodal.errors import ConfigError, TrimodalError
from trimodal.storage import (copy_to_local, location, prepare_folder, remove_tree, storage_errors, upload,
                              working_folder)

CHECKPOINTS = "checkpoints"
COMMIT = f"{CHECKPOINTS}/last.state.pt"  # written last by save_checkpoint; published last here


class RunFolder:
    """`target` as given; `local` is where the run's files are written (the target itself when local)."""

    def __init__(self, out):
        self.target = location(out)
        self.remote = not isinstance(self.target, Path)
        if self.remote:
            from trimodal.distributed import launched_rank

            rank = launched_rank()  # ranks on one node must not share a working copy
            local = working_folder("runs", self.target)
            self.local = local.with_name(local.name + (f"-rank{rank}" if rank else ""))
        else:
            self.local = self.target
        self._published: dict[str, tuple[int, int]] = {}

    # -- before a run -----------------------------------------------------------------------------

    def prepare(self, *, resume: bool, overwrite: bool) -> None:
        """The run folder ready to train into: checks as for a local folder, then the working copy."""
        if resume and overwrite:
            raise ConfigError("--resume and --overwrite contradict each other")
        if not self.remote:
            _prepare_local(self.local, resume=resume, overwrite=overwrite)
            return
        prepare_folder(self.target)
        with storage_errors(f"reading the run {self.target}"):
            existing = self._remote_files()
        if resume:
            if COMMIT not in existing:
                raise TrimodalError(f"{self.target} has no {COMMIT} to resume from")
            self.fetch(existing)
            return
        if existing:
            if not overwrite:
                raise TrimodalError(f"{self.target} is not empty; pass --resume to continue that run or --overwrite "
                                    "to replace it")
            remove_tree(self.target)
        shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True)

    def fetch(self, names: list[str] | None = None) -> None:
        """A fresh local copy of the run's files (all, or `names`)."""
        if not self.remote:
            return
        with storage_errors(f"reading the run {self.target}"):
            names = self._remote_files() if names is None else names
            missing = [name for name in names if not (self.target / name).is_file()]
            if missing or not names:
                raise TrimodalError(f"{self.target} is not a training run, or not a finished one (it has no "
                                    f"{', '.join(missing) or 'files'})")
            shutil.rmtree(self.local, ignore_errors=True)
            for name in names:
                copy_to_local(self.target / name, _ensure_parent(self.local / name))
                self._published[name] = _signature(self.local / name)

    # -- during and after a run -------------------------------------------------------------------

    def publish(self) -> None:
        """Upload what changed since the last call: the commit file last, then delete what the run removed."""
        if not self.remote:
            return
        files = {path.relative_to(self.local).as_posix(): path for path in sorted(self.local.rglob("*"))
                 if path.is_file() and not path.name.endswith(".tmp")}
        changed = [name for name, path in files.items() if self._published.get(name) != _signature(path)]
        changed.sort(key=lambda name: name == COMMIT)  # the commit file after everything it names
        with storage_errors(f"writing the run to {self.target}"):
            for name in changed:
                signature = _signature(files[name])
                upload(files[name], self.target / name)
                self._published[name] = signature
            for name in [name for name in self._published if name not in files]:
                (self.target / name).unlink(missing_ok=True)
                del self._published[name]

    def _remote_files(self) -> list[str]:
        if not self.target.exists():
            return []
        base = self.target.path.rstrip("/")
        return sorted(name[len(base) + 1:] for name in self.target.fs.find(base))


def _prepare_local(run: Path, *, resume: bool, overwrite: bool) -> None:
    if resume:
        if not (run / COMMIT).is_file():
            raise TrimodalError(f"{run} has no {COMMIT} to resume from")
        return
    if run.exists() and any(run.iterdir()):
        if not overwrite:
            raise TrimodalError(f"{run} is not empty; pass --resume to continue that run or --overwrite to replace it")
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)


def _ensure_parent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _signature(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns
