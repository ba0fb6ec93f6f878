"""A shard folder's `index.json`: what `mm shard` writes last and every reader opens first."""

from __future__ import annotations

import json
from trimodal.errors import ShardError
from trimodal.storage import location, storage_errors

FORMAT = "trimodal-shards/1"
INDEX = "index.json"


def read_index(path) -> dict:
    """The `index.json` of a shard folder (a local path or an object-storage URL); raises ShardError when
    there is none or it is not ours, StorageError when the storage fails."""
    index_path = location(path) / INDEX
    try:
        with storage_errors(f"reading {index_path}"):
            try:
                text = index_path.read_text(encoding="utf-8")
            except FileNotFoundError as error:
                if "bucket" in str(error).lower():
                    raise
                raise ShardError(f"{path} has no {INDEX}: it is not a finished shard folder (run `mm shard`)") from None
        index = json.loads(text)
    except (OSError, ValueError) as error:
        raise ShardError(f"cannot read {index_path}: {error}") from error
    if index.get("format") != FORMAT:
        raise ShardError(f"{index_path} has format {index.get('format')!r}; this trimodal reads {FORMAT!r}")
    return index
