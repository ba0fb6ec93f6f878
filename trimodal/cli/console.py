"""Everything the CLI draws: consoles, progress bars (plain lines when not a TTY), shared options."""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from trimodal.progress import Reporter, Task

# Logs and pipes get wide lines so that tables do not wrap; a terminal keeps its own width.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 120)

# A folder, or for cc3m and img2dataset also a URL in object storage (s3://bucket/data): `storage.location`.
Root = Annotated[str, typer.Option("--root", help="Folder that holds the raw datasets, one sub-folder each "
                                   "(cc3m: may be s3://… or gs://…).")]
SourceRoot = Annotated[str | None, typer.Option("--root", help="Folder that holds the raw datasets, one sub-folder "
                                                "each (custom: the dataset folder itself; cc3m, img2dataset: may be "
                                                "s3://… or gs://…).")]
Splits = Annotated[str | None, typer.Option("--splits", help="coco2014, mini-coco: karpathy (default) or official; "
                                             "coco2017: official.")]
JsonlManifest = Annotated[Path | None, typer.Option("--manifest", help="custom: a JSONL file, one sample per line "
                                                    "({key?, image, captions, audio?, split}, paths relative to it).")]
Workers = Annotated[int, typer.Option("--workers", min=1, help="Parallel workers.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
Device = Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu or cuda.")]


def say(message: str) -> None:
    console.print(escape(message), soft_wrap=True)


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/yellow] {escape(message)}", soft_wrap=True)


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


class _AmountColumn(ProgressColumn):
    """`12.3/45.6 MB` for byte tasks, `120/300 files` otherwise."""

    def render(self, task) -> Text:
        unit = task.fields.get("unit", "items")
        total = "?" if task.total is None else (human_bytes(task.total) if unit == "bytes" else f"{task.total:.0f}")
        done = human_bytes(task.completed) if unit == "bytes" else f"{task.completed:.0f}"
        return Text(f"{done}/{total}" + ("" if unit == "bytes" else f" {unit}"), style="progress.download")


class _SpeedColumn(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed:
            return Text("")
        unit = task.fields.get("unit", "items")
        return Text(f"{human_bytes(speed)}/s" if unit == "bytes" else f"{speed:.0f} {unit}/s", style="progress.data.speed")


class _RichTask(Task):
    def __init__(self, progress: Progress, task_id):
        self._progress, self._id = progress, task_id

    def advance(self, amount: float = 1) -> None:
        self._progress.advance(self._id, amount)

    def update(self, *, total: float | None = None, completed: float | None = None,
               description: str | None = None) -> None:
        self._progress.update(self._id, total=total, completed=completed,
                              description=escape(description) if description else None)

    def close(self, finished: bool = True) -> None:
        self._progress.stop_task(self._id)


class _PlainTask(Task):
    """One line when the work starts and one when it ends: nothing that floods a log file."""

    def __init__(self, description: str, total: float | None, unit: str):
        self._description, self._total, self._unit = description, total, unit
        self._done, self._started = 0.0, time.monotonic()
        self._lock = threading.Lock()  # library code may advance from worker threads
        err_console.print(f"{escape(description)} …", soft_wrap=True)

    def advance(self, amount: float = 1) -> None:
        with self._lock:
            self._done += amount

    def update(self, *, total: float | None = None, completed: float | None = None,
               description: str | None = None) -> None:
        self._total = total if total is not None else self._total
        self._done = completed if completed is not None else self._done

    def close(self, finished: bool = True) -> None:
        if not finished:  # the error or stop line that follows says what happened
            return
        amount = human_bytes(self._done) if self._unit == "bytes" else f"{self._done:.0f} {self._unit}"
        err_console.print(f"{escape(self._description)}: done, {amount} in {time.monotonic() - self._started:.1f} s",
                          soft_wrap=True)


class CliReporter(Reporter):
    def __init__(self, progress: Progress | None):
        self._progress = progress

    def task(self, description: str, total: float | None = None, unit: str = "items") -> Task:
        if self._progress is None:
            return _PlainTask(description, total, unit)
        return _RichTask(self._progress, self._progress.add_task(escape(description), total=total, unit=unit))

    def note(self, message: str, level: str = "info") -> None:
        if level == "warning":
            warn(message)
        else:
            err_console.print(escape(message), soft_wrap=True)


@contextmanager
def reporter(*, transient: bool = False, plain: bool = True):
    """A Reporter that draws rich progress bars on a terminal and plain lines elsewhere.

    `transient` bars vanish when done; `plain=False` prints nothing at all when not on a terminal.
    """
    if not err_console.is_terminal:
        yield CliReporter(None) if plain else Reporter()
        return
    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), _AmountColumn(),
               _SpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=transient) as progress:
        yield CliReporter(progress)
