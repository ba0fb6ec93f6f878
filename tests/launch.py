"""Launching the package the way users do, for tests that need separate processes: `torchrun` with gloo ranks
on the CPU, or one plain process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]


def _environment(extra: dict | None) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPOSITORY), **(extra or {})}


def torchrun(*args, nproc: int = 2, timeout: float = 600, env: dict | None = None, wait: bool = True):
    """`python -m torch.distributed.run --standalone --nproc-per-node=N ARGS…` from the repository root;
    with `wait=False` the Popen (in its own session, output piped)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               *map(str, args)]
    if not wait:
        return subprocess.Popen(command, cwd=REPOSITORY, env=_environment(env), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return subprocess.run(command, cwd=REPOSITORY, env=_environment(env), capture_output=True, text=True,
                          timeout=timeout)


def mm_torchrun(*args, **kwargs):
    """`torchrun … -m trimodal ARGS…`: `mm ARGS…` on every rank."""
    return torchrun("-m", "trimodal", *args, **kwargs)


def one_process(*args, timeout: float = 600, env: dict | None = None):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPOSITORY, capture_output=True, text=True,
                          timeout=timeout, env=_environment(env))


def succeeded(result) -> None:
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


def ranks_of(launcher: subprocess.Popen, count: int = 2, timeout: float = 60) -> list[int]:
    """The pids of the worker processes torchrun started (its children), once all `count` are up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
        if len(found) >= count:
            return sorted(int(pid) for pid in found)
        time.sleep(0.2)
    raise AssertionError(f"torchrun did not start {count} ranks within {timeout} s")


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def gone(pid: int) -> bool:
    """The process has exited (reaped, or a zombie its parent has not reaped yet)."""
    try:
        return "\tZ" in Path(f"/proc/{pid}/status").read_text().split("State:")[1].splitlines()[0]
    except (FileNotFoundError, IndexError):
        return True
