"""The dataset names each command accepts, read from the manifests (cheap: no source module is imported)."""

from __future__ import annotations

from functools import cache

from trimodal.pipeline.download.manifest import available, load_manifest


@cache
def _manifests():
    return [load_manifest(name) for name in available()]


def downloadable() -> str:
    return ", ".join(m.name for m in _manifests() if not m.local)


def readable() -> str:
    """Datasets `validate` and `shard` read: every one but those that only join another."""
    return ", ".join(m.name for m in _manifests() if not m.joins)


def joined() -> str:
    return ", ".join(f"{m.name} (joins {m.joins})" for m in _manifests() if m.joins)


def joining(name: str) -> str:
    """The datasets that join `name` (facc for flickr8k), as the user would type them."""
    return " or ".join(m.name for m in _manifests() if m.joins == name)


def speaks(name: str) -> bool:
    """Whether `name`'s manifest promises spoken captions of its own."""
    return any(m.name == name and "audio" in m.modalities for m in _manifests())
