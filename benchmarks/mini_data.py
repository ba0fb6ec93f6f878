"""What benchmark scripts share: `mm` run as a subprocess, the mini data prepared once, a key found in a
nested table (a resolved config)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent


def environment() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPOSITORY)}


def mm(*args, redact: Callable[[str], str] = lambda text: text) -> None:
    """`python -m trimodal ARGS…`, its output kept only for a failure (passed through `redact`)."""
    done = subprocess.run([sys.executable, "-m", "trimodal", *map(str, args)], cwd=REPOSITORY, env=environment(),
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(redact(f"mm {' '.join(map(str, args))} failed ({done.returncode}):\n"
                                f"{done.stdout[-3000:]}{done.stderr[-3000:]}"))


def prepare(workdir: Path) -> tuple[Path, Path]:
    """The mini dataset downloaded (synthesised), sharded and featurized on the CPU into `workdir`."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    started = time.perf_counter()
    mm("download", "mini", "--root", workdir / "data")
    mm("shard", "mini", "--root", workdir / "data", "--out", workdir / "shards")
    mm("featurize", workdir / "shards", "--out", workdir / "features.zarr", "--device", "cpu")
    print(f"data: mini downloaded, sharded and featurized into {workdir} in {time.perf_counter() - started:.0f} s")
    return workdir / "shards", workdir / "features.zarr"


def find(table: dict, key: str):
    """The first value under `key` anywhere in a nested table; None if there is none."""
    for name, value in table.items():
        if name == key:
            return value
        if isinstance(value, dict) and (found := find(value, key)) is not None:
            return found
    return None
