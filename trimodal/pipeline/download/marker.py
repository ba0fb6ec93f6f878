"""The download record of a dataset folder (`ROOT/NAME/.trimodal-download.json`), written last.

Its own module so that sources can ask which parts were downloaded without importing the HTTP stack.
"""

from __future__ import annotations

import json
from pathlib import Path

from trimodal.atomic import write_json

MARKER = ".trimodal-download.json"


def marker_path(root: Path, name: str) -> Path:
    return root / name / MARKER


def read_state(target: Path) -> dict:
    """The download record of a dataset folder, complete or not ({} when there is none)."""
    try:
        return json.loads((target / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def read_marker(root: Path, name: str) -> dict | None:
    """The completion record of `root/name`, or None when that download is not complete."""
    record = read_state(root / name)
    return record if record.get("complete") is True else None


def write_marker(target: Path, record: dict) -> None:
    write_json(target / MARKER, record, sort_keys=True)
