"""The one record type everything downstream of `sources/` sees, and the problems a scan finds."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Caption:
    id: int  # the dataset's caption number (Flickr8k `#n`)
    text: str
    audio: Path | None = None  # its spoken version, when the dataset has one
    speaker: str | None = None


@dataclass(frozen=True)
class Sample:
    """One image with all its captions and spoken captions."""

    key: str  # unique, stable, dot-free: the image stem
    split: str
    image: Path | None
    captions: tuple[Caption, ...] = ()
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Problem:
    kind: str
    severity: str  # "error" | "warning" | "info"
    file: str
    line: int | None = None
    detail: str = ""

    def to_dict(self) -> dict:
        return {"kind": self.kind, "severity": self.severity, "file": self.file, "line": self.line,
                "detail": self.detail}
