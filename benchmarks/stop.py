"""Stopping: the time from a SIGTERM to `mm train`'s written mid-epoch checkpoint, and to its exit.

    python benchmarks/stop.py [--config mmn-tiny] [--runs 3] [--num-workers 1] [--batch-size 16] [--after-epochs 2]
                              [--workdir /tmp/trimodal-bench-stop] [--shards SHARDS --features STORE.zarr]

Prepares the mini data once in the workdir (`mm download mini`, `mm shard mini`, `mm featurize --device cpu`),
unless --shards and --features name it, then for each run starts

    python -m trimodal train CONFIG --shards … --features … --out WORKDIR/run-N \
        train.epochs=50 train.num_workers=K train.batch_size=B train.log_every=1

in its own session and watches its run folder from this process every 5 ms. After `--after-epochs` whole
epochs (each ends with validation and an end-of-epoch checkpoint), as soon as the `train` record of the
middle batch of the next epoch appears in metrics.jsonl, it sends SIGTERM to the process group (the trainer
and its loader workers, as SLURM signals a job) and measures, from the signal:

- to the step's end: the first new file in checkpoints/ (the trainer finishes the step in flight, which has
  only just begun, then starts writing);
- to the checkpoint: a new `checkpoints/last.state.pt` in place (written last, the checkpoint's commit);
- to the exit: the process has exited. Its status must be 75, its stop line must name a batch inside the
  epoch, and the new last.state.pt must hold that position (`epoch_done` false).

Baselines, observed the same way in the same runs: one training step (the interval between consecutive
`train` records of one epoch, before the signal, not counting the first epoch unless it is the one signalled),
and the end-of-epoch checkpoint (from its epoch's `val` record, logged just before it, to its new
last.state.pt). Prints a markdown table of the runs and
`stop: signal->checkpoint p50 X s, signal->exit p50 Y s; one step p50 Z s; ratio checkpoint/step = X/Z`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))

from mini_data import environment, find, prepare  # noqa: E402

from trimodal.signals import RESUMABLE_EXIT  # noqa: E402
from trimodal.training.config import shipped_config  # noqa: E402

POLL = 0.005  # seconds between two looks at the run folder
STOP_LINE = re.compile(r"stopped by SIGTERM at step (\d+), batch (\d+)/(\d+) of epoch (\d+)")








class RunWatch:
    """What an observer sees of a run folder: each metrics.jsonl record and each new last.state.pt, with the
    time (perf_counter) of the first poll that saw it."""

    def __init__(self, run: Path):
        self.run = run
        self.records: list[tuple[float, dict]] = []
        self.commits: list[float] = []
        self._metrics = None
        self._partial = ""
        self._state = None

    def poll(self) -> float:
        now = time.perf_counter()
        if self._metrics is None and (self.run / "metrics.jsonl").is_file():
            self._metrics = open(self.run / "metrics.jsonl", encoding="utf-8")
        if self._metrics is not None:
            self._partial += self._metrics.read()
            *lines, self._partial = self._partial.split("\n")
            self.records += [(now, json.loads(line)) for line in lines if line]
        try:
            found = os.stat(self.run / "checkpoints" / "last.state.pt")
            identity = (found.st_ino, found.st_mtime_ns)  # a rename puts a new inode in place
        except FileNotFoundError:
            identity = None
        if identity is not None and identity != self._state:
            self.commits.append(now)
        self._state = identity
        return now

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()

    def first_commit_after(self, moment: float) -> float | None:
        return next((t for t in self.commits if t >= moment), None)


@dataclass
class Run:
    stopped_at: str
    to_step_end: float
    to_checkpoint: float
    to_exit: float
    status: int
    steps: list[float] = field(default_factory=list)  # intervals between consecutive train records
    end_of_epoch: list[float] = field(default_factory=list)  # val record -> new last.state.pt


def one_run(args, config: Path, shards: Path, features: Path, number: int) -> Run:
    run = args.workdir / f"run-{number}"
    shutil.rmtree(run, ignore_errors=True)
    log = args.workdir / f"run-{number}.log"
    overrides = ["train.epochs=50", f"train.num_workers={args.num_workers}", f"train.batch_size={args.batch_size}",
                 "train.log_every=1"]
    command = [sys.executable, "-m", "trimodal", "train", str(config), "--shards", str(shards), "--features",
               str(features), "--out", str(run), *overrides]
    watch = RunWatch(run)
    with open(log, "w") as output:
        job = subprocess.Popen(command, cwd=REPOSITORY, env=environment(), stdout=output, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        batches = _steps_per_epoch(run, job, args.timeout)
        middle = batches // 2
        target = args.after_epochs * batches + middle  # the step whose record triggers the signal
        deadline = time.perf_counter() + args.timeout
        while not any(r["type"] == "train" and r["step"] >= target for _, r in watch.records):
            if job.poll() is not None or time.perf_counter() > deadline:
                raise SystemExit(f"run {number}: training did not reach step {target} "
                                 f"(status {job.poll()}); see {log}")
            watch.poll()
            time.sleep(POLL)
        folder = run / "checkpoints"
        before = set(os.listdir(folder)) if folder.is_dir() else set()
        signalled = time.perf_counter()
        os.killpg(job.pid, signal.SIGTERM)  # the trainer and its loader workers, as SLURM signals a job
        step_end = checkpoint = exited = None
        deadline = signalled + args.timeout
        while exited is None:
            now = watch.poll()
            if step_end is None and folder.is_dir() and set(os.listdir(folder)) - before:
                step_end = now
            if checkpoint is None:
                checkpoint = watch.first_commit_after(signalled)
            if job.poll() is not None:
                exited = now
            elif now > deadline:
                raise SystemExit(f"run {number}: still running {args.timeout} s after SIGTERM; see {log}")
            else:
                time.sleep(POLL)
        watch.poll()
    finally:
        watch.close()
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    text = log.read_text(errors="replace")
    stop = STOP_LINE.search(text)
    if job.returncode != RESUMABLE_EXIT or stop is None or checkpoint is None:
        raise SystemExit(f"run {number}: exit status {job.returncode} (want {RESUMABLE_EXIT}), stop line "
                         f"{'found' if stop else 'missing'}, new last.state.pt {'seen' if checkpoint else 'not seen'}:"
                         f"\n{text[-3000:]}")
    step, batch, of, epoch = map(int, stop.groups())
    _check_state(run, number, step, batch, of, epoch)
    counted = min(1, args.after_epochs)  # the first epoch pays the process's one-time costs
    train = [(t, r) for t, r in watch.records if r["type"] == "train" and t < signalled]
    steps = [t2 - t1 for (t1, r1), (t2, r2) in zip(train, train[1:])
             if r1["epoch"] == r2["epoch"] >= counted and r2["step"] == r1["step"] + 1]
    end_of_epoch = [commit - t for t, r in watch.records if r["type"] == "val" and t < signalled
                    if (commit := watch.first_commit_after(t)) is not None and commit < signalled]
    return Run(f"step {step}, batch {batch}/{of} of epoch {epoch}", (step_end or checkpoint) - signalled,
               checkpoint - signalled, exited - signalled, job.returncode, steps, end_of_epoch)


def _steps_per_epoch(run: Path, job: subprocess.Popen, timeout: float) -> int:
    """From the run's config.resolved.toml, which `mm train` writes before its first step."""
    resolved = run / "config.resolved.toml"
    deadline = time.perf_counter() + timeout
    while True:
        if resolved.is_file():
            try:
                found = find(tomllib.loads(resolved.read_text()), "steps_per_epoch")
            except tomllib.TOMLDecodeError:  # caught while being written
                found = None
            if found:
                return int(found)
        if job.poll() is not None or time.perf_counter() > deadline:
            raise SystemExit(f"mm train wrote no steps_per_epoch to {resolved} (status {job.poll()})")
        time.sleep(0.05)




def _check_state(run: Path, number: int, step: int, batch: int, of: int, epoch: int) -> None:
    """The stop was mid-epoch and the committed checkpoint holds that position."""
    import torch

    state = torch.load(run / "checkpoints" / "last.state.pt", map_location="cpu", weights_only=True)
    held = (state["step"], state.get("epoch_done", True), state.get("batches_done"), state["epoch"] + 1)
    if not 0 < batch < of or held != (step, False, batch, epoch):
        raise SystemExit(f"run {number}: stopped at batch {batch}/{of} of epoch {epoch}, step {step}, but "
                         f"last.state.pt holds (step, epoch_done, batches_done, epoch) = {held}: not a mid-epoch "
                         "checkpoint of that position")


def _p50(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="mmn-tiny", help="a shipped config's name or a TOML path")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/trimodal-bench-stop"),
                        help="emptied first when it receives the prepared data; runs go to WORKDIR/run-N")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--num-workers", type=int, default=1, help="train.num_workers")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="train.batch_size (16: 12 steps per epoch of the mini set)")
    parser.add_argument("--after-epochs", type=int, default=2,
                        help="whole epochs (each with its end-of-epoch checkpoint) before the signalled one")
    parser.add_argument("--shards", type=Path, help="use these shards (with --features) instead of preparing mini")
    parser.add_argument("--features", type=Path)
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for each phase of a run")
    args = parser.parse_args()
    if (args.shards is None) != (args.features is None):
        parser.error("--shards and --features go together")
    config = Path(args.config) if Path(args.config).is_file() else shipped_config(args.config)
    if args.shards is None:
        shards, features = prepare(args.workdir)
    else:
        shards, features = args.shards, args.features
        args.workdir.mkdir(parents=True, exist_ok=True)

    runs = [one_run(args, config, shards, features, n + 1) for n in range(args.runs)]
    print(f"config: {config.relative_to(REPOSITORY) if config.is_relative_to(REPOSITORY) else config}, "
          f"batch {args.batch_size}, {args.num_workers} loader worker(s), SIGTERM to the process group when the "
          f"record of the middle batch of epoch {args.after_epochs + 1} appears; polled every {POLL * 1000:.0f} ms")
    print()
    print("| run | stopped at | signal → step end (s) | checkpoint write (s) | signal → checkpoint (s) "
          "| signal → exit (s) | exit status | one step p50 (s) | end-of-epoch checkpoint (s) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for number, run in enumerate(runs, 1):
        print(f"| {number} | {run.stopped_at} | {run.to_step_end:.3f} | {run.to_checkpoint - run.to_step_end:.3f} "
              f"| {run.to_checkpoint:.3f} | {run.to_exit:.3f} | {run.status} | {_seconds(_p50(run.steps))} "
              f"| {' / '.join(f'{s:.3f}' for s in run.end_of_epoch) or '—'} |")
    print()
    to_checkpoint = _p50([r.to_checkpoint for r in runs])
    to_exit = _p50([r.to_exit for r in runs])
    steps = [s for r in runs for s in r.steps]
    step = _p50(steps)
    writes = _p50([r.to_checkpoint - r.to_step_end for r in runs])
    end_of_epoch = _p50([s for r in runs for s in r.end_of_epoch])
    print(f"baseline: one step p50 {_seconds(step)} s over {len(steps)} steps (consecutive train records); "
          f"end-of-epoch checkpoint p50 {_seconds(end_of_epoch)} s over {sum(len(r.end_of_epoch) for r in runs)} "
          f"(val record -> last.state.pt); mid-epoch checkpoint write p50 {writes:.3f} s (first new file -> "
          "last.state.pt)")
    if step is None:
        raise SystemExit("no two consecutive training records before the signal: no step time to compare with")
    print(f"stop: signal->checkpoint p50 {to_checkpoint:.3f} s, signal->exit p50 {to_exit:.3f} s; "
          f"one step p50 {step:.3f} s; ratio checkpoint/step = {to_checkpoint / step:.2f}")

if __name__ == "__main__":
    main()
