"""Stop signals (SIGTERM, SIGUSR1, Ctrl-C) as the library sees them.

Two ways to stop, one per kind of work:

- `raise_on_stop_signals()`: SIGTERM, SIGUSR1 and Ctrl-C raise `Stopped` where the program is, so that
  `finally` blocks and atomic writes clean up and what was complete stays complete (download, shard,
  featurize: a rerun finishes the job). `Stopped` is a BaseException, as KeyboardInterrupt is, so that no
  `except Exception` on the way swallows it.
- `StopRequests`: a training loop asks `requested` at its step boundaries instead; the first SIGTERM,
  SIGUSR1 or Ctrl-C only sets it, a second Ctrl-C raises `Stopped` at once.

Both only work in the main thread (Python delivers signals there) and restore the previous handlers.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# `mm train` stopped by a signal or its time limit, with a checkpoint to resume from (sysexits' EX_TEMPFAIL:
# "try again later"; a SLURM script requeues on it).
RESUMABLE_EXIT = 75


class Stopped(BaseException):
    """A stop signal ended the command; `exit_code` is the shell's 128 + the signal's number."""

    def __init__(self, signum: int, message: str | None = None):
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        super().__init__(message or f"stopped by {self.signal_name}; what was complete is kept, and the same "
                                    "command run again continues from there")


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def raise_on_stop_signals():
    """SIGTERM, SIGUSR1 and SIGINT (Ctrl-C) raise `Stopped` inside the block."""
    if not _in_main_thread():
        yield
        return

    def stop(signum, frame):
        raise Stopped(signum)

    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class StopRequests:
    """A flag set by the first stop signal (see the module doc); use as a context manager."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal_name == "SIGINT":  # the second Ctrl-C: stop now
            raise Stopped(signum, "stopped at once by a second Ctrl-C; the last checkpoint written is whole "
                                  "(resume from it with --resume)")
        if self.signal_name is None or signum == signal.SIGINT:
            self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> StopRequests:
        if _in_main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


def ignore_stop_signals(*_) -> None:
    """For helper processes (data loader workers): stop signals are the main process's to act on; a SLURM
    SIGTERM to every process of the job, or Ctrl-C to the terminal's process group, must not kill them
    mid-batch. Usable as a DataLoader `worker_init_fn`."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
