"""CLIP_benchmark's webdataset layout over our shards, without copying a tar.

CLIP_benchmark (`clip_benchmark eval --dataset wds/<name> --dataset_root DIR`) reads

    DIR/dataset_type.txt        "retrieval"
    DIR/<split>/nshards.txt     the number of tars
    DIR/<split>/0.tar …         the tars, numbered from 0

and takes each sample's image and the lines of its `txt` member as the positives: what our `KEY.txt`
already is. So the view is relative symbolic links to the split's shards in `index.json` order plus the two
text files, `nshards.txt` written last (a view without it is unfinished); rewriting it replaces the links.
Local shard folders only: object storage has no links (CLIP_benchmark reads local paths and http(s) URLs).
"""

from __future__ import annotations

import os
from pathlib import Path

from trimodal.atomic import atomic_path
from trimodal.errors import ConfigError, ShardError
from trimodal.storage import is_remote, location

DEFAULT_FOLDER = "clip_benchmark"
DATASET_TYPE = "retrieval"


def write_benchmark_view(shards, out=None, splits: tuple[str, ...] = ("test",)) -> dict:
    """Write the view of `splits` of the shard folder `shards` into `out` (default `shards/clip_benchmark`);
    returns {"root": out, "splits": {split: tars}}."""
    from trimodal.pipeline.read.index import read_index

    shards = location(shards)
    if is_remote(shards):
        raise ConfigError(f"{shards}: CLIP_benchmark's layout is made of links, which object storage does not have; "
                          "run it on a local copy of the shards")
    index = read_index(shards)
    out = Path(out) if out is not None else Path(shards) / DEFAULT_FOLDER
    missing = [split for split in splits if split not in index["splits"]]
    if missing:
        raise ConfigError(f"{shards} has no split {', '.join(map(repr, missing))} (it has {', '.join(index['splits'])})")
    written = {}
    try:
        for split in splits:
            names = [entry["name"] for entry in index["splits"][split]["shards"]]
            for name in names:
                if Path(name).name != name or not (Path(shards) / name).is_file():
                    raise ShardError(f"{shards / 'index.json'} lists {name!r}, which is not a tar in {shards}")
            folder = out / split
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "nshards.txt").unlink(missing_ok=True)  # unfinished until it is written again
            for old in folder.glob("*.tar"):
                if old.is_symlink():
                    old.unlink()
            for number, name in enumerate(names):
                os.symlink(os.path.relpath(Path(shards).resolve() / name, folder.resolve()), folder / f"{number}.tar")
            with atomic_path(folder / "nshards.txt") as path:
                path.write_text(f"{len(names)}\n", encoding="utf-8")
            written[split] = len(names)
        with atomic_path(out / "dataset_type.txt") as path:
            path.write_text(f"{DATASET_TYPE}\n", encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot write CLIP_benchmark's layout in {out}: {error.strerror or error}") from error
    return {"root": out, "splits": written}
