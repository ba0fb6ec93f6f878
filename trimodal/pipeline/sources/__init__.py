"""Dataset recipes: each turns one raw layout into Samples. Looked up by dataset name."""

from __future__ import annotations

from pathlib import Path

from trimodal.errors import DatasetLayoutError
from trimodal.pipeline.sources import flickr8k

# The mini dataset is laid out exactly like Flickr8k + FACC, so one recipe reads both.
_SCANNERS = {"flickr8k": flickr8k.scan, "mini": flickr8k.scan}
_JOINED = {"facc": "flickr8k"}


def scannable() -> list[str]:
    return sorted(_SCANNERS)


def scan_source(name: str, root: Path) -> flickr8k.Scan:
    if name in _JOINED:
        raise DatasetLayoutError(
            f"{name} is not read on its own: it joins {_JOINED[name]} (use `{_JOINED[name]}` with the same --root)"
        )
    if name not in _SCANNERS:
        raise DatasetLayoutError(f"no recipe reads {name!r} yet; datasets with one: {', '.join(scannable())}")
    return _SCANNERS[name](Path(root), name)
