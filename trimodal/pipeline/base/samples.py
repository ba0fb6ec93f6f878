"""The one record type everything downstream of `sources/` sees, and the problems a scan finds."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "val", "test")


KEY_BYTES = 64  # the feature store keeps each key as NUL-padded ASCII of this width


def key_problem(key: str) -> str | None:
    """Why a key cannot name tar members and feature-store rows, or None.

    Webdataset groups members by basename up to the first dot, so a key has no dot, slash or
    backslash; the feature store holds printable ASCII keys of at most KEY_BYTES.
    """
    if not key:
        return "is empty"
    if not key.isascii() or not key.isprintable():
        return "is not printable ASCII"
    if any(character in key for character in "./\\"):
        return "contains a dot, slash or backslash"
    if len(key) > KEY_BYTES:
        return f"is longer than {KEY_BYTES} bytes"
    return None


def sample_key(stem: str) -> str:
    """A file stem made a webdataset key: dot-free, because webdataset splits member names at the first dot."""
    return stem.replace(".", "_")


def one_line(text: str) -> str:
    """A caption as it goes into `KEY.txt`: whitespace runs (COCO's stray spaces, newlines) made one space."""
    return " ".join(text.split())


@dataclass(frozen=True, slots=True)
class Caption:
    id: int  # the dataset's caption id (Flickr8k `#n`, COCO annotation id)
    text: str  # one line, whitespace collapsed
    # The path of its spoken version, when the dataset has one. A string, not a Path: SpokenCOCO's 605k
    # PosixPath objects (a list of parts each) took ~400 MB more than strings in a scan (measured).
    audio: str | None = None
    speaker: str | None = None
    raw: str | None = None  # the dataset's own string, when it differs from `text`


@dataclass(frozen=True, slots=True)
class Sample:
    """One image with all its captions and spoken captions."""

    key: str  # unique, stable, dot-free: the image stem
    split: str
    image: Path | None
    captions: tuple[Caption, ...] = ()
    meta: dict = field(default_factory=dict)  # `image_file` (as shown to users), plus ids that go into KEY.json


@dataclass(frozen=True)
class Problem:
    kind: str
    severity: str  # "error" | "warning" | "info"
    file: str
    line: int | None = None
    detail: str = ""
    # "sample" or "utterance" when the problem keeps one out of the shards: `mm shard` lists it under
    # `skipped` and counts it towards --max-bad, like an image that does not decode.
    drops: str | None = None
    key: str | None = None  # the sample it concerns, when there is one
    split: str | None = None  # that sample's split, when known
    count: int = 1  # how many items it stands for (one failure reason of many URLs)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "severity": self.severity, "file": self.file, "line": self.line,
                "detail": self.detail, "count": self.count}
