"""When a training run writes a checkpoint between epochs and when it stops early, decided at optimizer step
boundaries with one answer for all ranks.

A stop comes from a signal (SIGTERM, SIGUSR1, a first Ctrl-C: `trimodal.signals.StopRequests`) on any
rank, or from the time limit (`train.max_minutes`, `mm train --time-limit`), which rank 0 watches: it
stops when the time left would not cover two more of the slowest steps so far, the validation that
ends an epoch (when one is next) and the slowest checkpoint so far. Every rank sends its flags to an
all-reduce (maximum) at every step boundary, so all stop after the same step and none is left waiting
inside a collective; a single process reduces nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from trimodal import distributed
from trimodal.signals import StopRequests
from trimodal.training.settings import TrainConfig

REASONS = (None, "SIGTERM", "SIGUSR1", "SIGINT", "the time limit", "a requested stop")
TIME_LIMIT, REQUESTED = 4, 5


@dataclass
class Stop:
    """Where a run stopped early, and why."""

    reason: str
    epoch: int
    step: int
    batch: int  # global batches of the epoch done
    batches: int  # in the epoch


def parse_time_limit(text: str) -> float:
    """Minutes in a time limit written as SLURM writes them ("90", "1:30:00", "2-00:00:00", "MM:SS", "D-HH",
    "D-HH:MM") or with a unit ("90m", "1.5h", "45s")."""
    from trimodal.errors import ConfigError

    value = text.strip().lower()
    try:
        for unit, scale in (("s", 1 / 60), ("m", 1.0), ("h", 60.0)):
            if value.endswith(unit):
                minutes = float(value[:-1]) * scale
                break
        else:
            days, dash, clock = value.rpartition("-")
            if dash and not days:
                raise ValueError(value)
            parts = [float(p) for p in clock.split(":")]
            if days:  # D-HH, D-HH:MM, D-HH:MM:SS
                parts += [0.0] * (3 - len(parts))
                minutes = float(days) * 1440 + parts[0] * 60 + parts[1] + parts[2] / 60
            elif len(parts) == 1:  # MM
                minutes = parts[0]
            elif len(parts) == 2:  # MM:SS
                minutes = parts[0] + parts[1] / 60
            elif len(parts) == 3:  # HH:MM:SS
                minutes = parts[0] * 60 + parts[1] + parts[2] / 60
            else:
                raise ValueError(value)
    except ValueError:
        raise ConfigError(f"time limit {text!r} is not minutes, HH:MM:SS, D-HH:MM:SS or a number with s, m or h") \
            from None
    if minutes <= 0:
        raise ConfigError(f"time limit {text!r} must be positive")
    return minutes


class StepBoundary:
    """Asked at every optimizer step boundary (`at_step`) and told how long validations and checkpoints
    took (`validated`, `checkpointed`)."""

    def __init__(self, settings: TrainConfig, dist: distributed.Dist, requests: StopRequests, started: float,
                 stop_at_step: int | None = None):
        self.settings, self.dist, self.requests, self.started = settings, dist, requests, started
        self.stop_at_step = stop_at_step  # tests: stop as a signal would, after this step
        now = time.monotonic()
        self._last_boundary = self._last_checkpoint = now
        self.step_seconds = self.checkpoint_seconds = self.validation_seconds = 0.0

    def restart_clock(self) -> None:
        """The next step starts now (after a validation or a checkpoint, which are not a step's time)."""
        self._last_boundary = time.monotonic()

    def validated(self, seconds: float) -> None:
        self.validation_seconds = max(self.validation_seconds, seconds)
        self.restart_clock()

    def checkpointed(self, seconds: float) -> None:
        self.checkpoint_seconds = max(self.checkpoint_seconds, seconds)
        self._last_checkpoint = time.monotonic()
        self.restart_clock()

    def at_step(self, step: int, *, epoch_ends_next: bool) -> tuple[str | None, bool]:
        """(why the run stops after this step, or None; whether a mid-epoch checkpoint is due)."""
        now = time.monotonic()
        self.step_seconds = max(self.step_seconds, now - self._last_boundary)
        self._last_boundary = now
        code = REASONS.index(self.requests.signal_name) if self.requests.requested else 0
        if self.stop_at_step is not None and step >= self.stop_at_step:
            code = max(code, REQUESTED)
        minutes_due = 0
        if self.dist.main:
            if self._out_of_time(now, epoch_ends_next):
                code = max(code, TIME_LIMIT)
            every = self.settings.checkpoint_every_minutes
            minutes_due = int(bool(every) and now - self._last_checkpoint >= every * 60)
        if self.dist.enabled:
            code, minutes_due = distributed.all_max([code, minutes_due], device=self._flag_device())
        every_steps = self.settings.checkpoint_every_steps
        return REASONS[code], bool(minutes_due) or bool(every_steps and step % every_steps == 0)

    def stop_between_epochs(self) -> str | None:
        """Why the run stops before its next epoch (a signal during validation or the checkpoint, or too
        little time for another step), or None."""
        code = REASONS.index(self.requests.signal_name) if self.requests.requested else 0
        if self.dist.main and self._out_of_time(time.monotonic(), False):
            code = max(code, TIME_LIMIT)
        if self.dist.enabled:
            code = distributed.all_max([code], device=self._flag_device())[0]
        return REASONS[code]

    def _out_of_time(self, now: float, epoch_ends_next: bool) -> bool:
        limit = self.settings.max_minutes
        if not limit:
            return False
        needed = 2 * self.step_seconds + self.checkpoint_seconds + (self.validation_seconds if epoch_ends_next else 0)
        return now - self.started + needed >= limit * 60

    def _flag_device(self):
        # NCCL reduces CUDA tensors only; gloo CPU ones.
        return self.dist.device if self.dist.backend == "nccl" else "cpu"
