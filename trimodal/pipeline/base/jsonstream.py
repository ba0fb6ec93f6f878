"""Large JSON annotation files (COCO, Karpathy, SpokenCOCO) read one element at a time.

`json.load` of SpokenCOCO's 600k-utterance file builds every dict at once; ijson's C parser yields the
elements under one prefix (`annotations.item`) and keeps only the current one. A file that does not
parse is reported with its line and column, found by the standard parser on that error path only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import ijson


class MalformedJson(Exception):
    """Raised by `json_items`; `line`/`column` locate the error, `message` says what it is."""

    def __init__(self, line: int | None, column: int | None, message: str):
        self.line, self.column, self.message = line, column, message
        where = f"line {line}, column {column}: " if line else ""
        super().__init__(where + message)


def json_items(path: Path, prefix: str) -> Iterator:
    """Each element at `prefix` (ijson syntax: `images.item`, `data.item`) of a JSON file, in order."""
    try:
        with open(path, "rb") as reader:
            yield from ijson.items(reader, prefix, use_float=True)
    except (ijson.JSONError, UnicodeDecodeError) as error:
        raise _locate(path, error) from None


def _locate(path: Path, error: Exception) -> MalformedJson:
    try:
        with open(path, "rb") as reader:
            json.load(reader)
    except json.JSONDecodeError as exact:
        return MalformedJson(exact.lineno, exact.colno, exact.msg)
    except (UnicodeDecodeError, ValueError) as other:
        return MalformedJson(None, None, str(other))
    return MalformedJson(None, None, " ".join(str(error).split()))
