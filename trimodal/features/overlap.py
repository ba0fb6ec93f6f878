"""Two threads around a loop, joined by bounded queues: one working ahead of it, one writing behind it.

`Ahead` runs `produce(item)` for the next items while the loop works on this one; `Behind` runs
`consume(result)` on the loop's results in the order given. Either thread's exception is raised in the
loop (the same exception object, so its type and message survive), and neither can leave the loop
waiting: every blocking put and get gives up once the other side has stopped.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator

_POLL_S = 0.1
_DONE = object()


class Ahead:
    """Iterate `produce(item)` for `items`, computed on a thread at most `depth` results ahead."""

    def __init__(self, items: Iterable, produce: Callable, *, depth: int = 1, name: str = "ahead"):
        self._items, self._produce = items, produce
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._items:
                if self._stop.is_set() or not self._put((True, self._produce(item))):
                    return
            self._put((True, _DONE))
        except BaseException as error:  # handed to the loop, which raises it
            self._put((False, error))

    def _put(self, entry) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator:
        while True:
            try:
                ok, value = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    return  # stopped by close()
                continue
            if not ok:
                raise value
            if value is _DONE:
                return
            yield value

    def close(self) -> None:
        """Stop producing; waits for the item in hand to finish (nothing is interrupted mid-way)."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                pass

    def __enter__(self) -> "Ahead":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.close()
            return
        # The loop failed or was stopped (a signal): what the thread holds is thrown away, so it is not
        # waited for. It only reads, and a read stuck on a slow or hung file system must not hang the exit.
        self._stop.set()


class Behind:
    """`consume(result)` on a thread, in submission order, at most `depth` results queued.

    After the first failure nothing more is consumed; the error is raised by the next `submit()` or by
    `close()`. Leaving the `with` block on an exception of the loop's own still consumes what was
    submitted (finished work is kept), then lets that exception through.
    """

    def __init__(self, consume: Callable, *, depth: int = 1, name: str = "behind"):
        self._consume = consume
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            value = self._queue.get()
            if value is _DONE:
                return
            if self._error is None:
                try:
                    self._consume(value)
                except BaseException as error:  # raised in the loop by submit() or close()
                    self._error = error

    def submit(self, value) -> None:
        while True:
            if self._error is not None:
                raise self._error
            try:
                self._queue.put(value, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Wait until everything submitted is consumed; raise the first failure."""
        if self._thread.is_alive():
            self._queue.put(_DONE)  # the thread drains the queue whatever happens, so this cannot block for long
            self._thread.join()
        if self._error is not None:
            raise self._error

    def __enter__(self) -> "Behind":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.close()
            return
        try:
            self.close()
        except BaseException:  # noqa: S110 - the loop's own exception is the one to report
            pass
