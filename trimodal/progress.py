"""How library code reports progress and notes without printing: the CLI passes a Reporter."""

from __future__ import annotations


class Task:
    """One unit of long work; `advance` as it goes, `close` when done."""

    def advance(self, amount: float = 1) -> None:
        pass

    def update(self, *, total: float | None = None, completed: float | None = None,
               description: str | None = None) -> None:
        pass

    def close(self, finished: bool = True) -> None:
        """The work ended: done (`finished`), or cut short by an error or a stop signal."""

    def __enter__(self) -> "Task":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close(finished=kind is None)


class Reporter:
    """Receives progress tasks and short notes from library code. This base class ignores them."""

    def task(self, description: str, total: float | None = None, unit: str = "items") -> Task:
        return Task()

    def note(self, message: str, level: str = "info") -> None:
        pass


SILENT = Reporter()
