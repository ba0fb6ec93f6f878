"""`mm info`: what a shard folder holds, or what a raw dataset root has downloaded."""

from __future__ import annotations

import os
from pathlib import Path

from trimodal.errors import TrimodalError
from trimodal.pipeline.download.archives import DOWNLOADS
from trimodal.pipeline.download.marker import MARKER, read_state
from trimodal.pipeline.download.manifest import available
from trimodal.pipeline.read.index import INDEX, read_index
from trimodal.storage import location, storage_errors


def describe(path: Path) -> dict:
    path = location(path)
    with storage_errors(f"reading {path}"):
        if not path.exists():
            raise TrimodalError(f"{path} does not exist")
        shards = (path / INDEX).is_file()
    if shards:
        with storage_errors(f"reading {path}"):
            return describe_shards(path)
    if (path / MARKER).is_file():  # a dataset folder itself: describe its root, this dataset only
        return describe_root(path.parent, only=path.name)
    return describe_root(path)


def describe_shards(path: Path) -> dict:
    index = read_index(path)
    splits = {}
    missing = []
    for name, split in index["splits"].items():
        for shard in split["shards"]:
            tar = path / shard["name"]
            if not tar.is_file() or tar.stat().st_size != shard["bytes"]:
                missing.append(shard["name"])
        splits[name] = {"samples": split["samples"], "captions": split["captions"], "utterances": split["utterances"],
                        "shards": len(split["shards"]), "bytes": sum(s["bytes"] for s in split["shards"])}
    return {"kind": "shards", "path": str(path), "dataset": index["dataset"], "format": index["format"],
            "modalities": index.get("modalities", []), "args": index.get("args", {}), "splits": splits,
            "skipped": len(index.get("skipped", [])), "missing_or_changed_shards": missing}


def describe_root(root: Path, only: str | None = None) -> dict:
    datasets = []
    for name in available():
        if only and name != only:
            continue
        folder = root / name
        if not folder.exists():
            continue
        state = read_state(folder)
        complete = state.get("complete") is True
        parts = state.get("parts", [])
        files, size = _tree_size(folder)
        datasets.append({"name": name, "status": "complete" if complete else "partial" if parts else "incomplete",
                         "parts": parts, "files": files, "bytes": size,
                         "verified": bool(state.get("verified") or state.get("synthetic"))})
    partial = sorted(p.name for p in (root / DOWNLOADS).glob("*.part")) if (root / DOWNLOADS).is_dir() else []
    if not datasets and not partial:
        raise TrimodalError(f"{root} is neither a shard folder (no {INDEX}) nor a dataset root "
                            f"(no {', '.join(available())} folder inside)")
    return {"kind": "raw", "path": str(root), "datasets": datasets, "partial_downloads": partial}


def _tree_size(folder: Path) -> tuple[int, int]:
    files = size = 0
    for directory, _, names in os.walk(folder):
        for name in names:
            if not name.startswith("."):
                files += 1
                size += os.path.getsize(os.path.join(directory, name))
    return files, size
