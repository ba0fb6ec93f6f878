"""Atomic file writes: write `*.tmp` beside the target, then `os.replace`, so a reader never sees half a file.

`write_json` and `write_jsonl` also take an object-storage path (`trimodal.storage`), where the object
appears whole when its upload completes."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path to write; it replaces `path` when the block ends without an error."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_jsonl(path: Path, rows) -> None:
    """One JSON object per line."""
    _write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_json(path: Path, value, *, sort_keys: bool = False) -> None:
    _write_text(path, json.dumps(value, indent=2, ensure_ascii=False, sort_keys=sort_keys) + "\n")


def _write_text(path, text: str) -> None:
    from trimodal.storage import location, open_atomic

    with open_atomic(location(path), "wb") as handle:
        handle.write(text.encode("utf-8"))
