"""A shard folder's `index.json`: what `mm shard` writes last and every reader opens first."""

from __future__ import annotations

import json
from pathlib import Path

from trimodal.errors import ShardError

FORMAT = "trimodal-shards/1"
INDEX = "index.json"


def read_index(path: Path) -> dict:
    """The `index.json` of a shard folder; raises ShardError when there is none or it is not ours."""
    index_path = Path(path) / INDEX
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShardError(f"{path} has no {INDEX}: it is not a finished shard folder (run `mm shard`)") from None
    except (OSError, ValueError) as error:
        raise ShardError(f"cannot read {index_path}: {error}") from error
    if index.get("format") != FORMAT:
        raise ShardError(f"{index_path} has format {index.get('format')!r}; this trimodal reads {FORMAT!r}")
    return index
