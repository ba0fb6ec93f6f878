"""A shard as (image, caption) pairs: one webdataset sample per caption, for tools whose loaders read one
caption per sample from `KEY.txt` (open_clip_train's webdataset reader tokenizes the whole member, so our
five-line `KEY.txt` would become one string).

Nothing is copied to disk: `mm pairs SHARD.tar` writes the pairs' tar to stdout, which webdataset reads
through a `pipe:` URL (`--train-data 'pipe:mm pairs shards/coco/train-{000000..000082}.tar'`). Sample
`KEY_<n>` holds the image's bytes as they are in the shard (`jpg`, `png`, …), caption n alone (`txt`), and
`json` naming the image's key, the caption's number and its id. A sample without an image or a caption
gives no pair, and is counted.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from trimodal.pipeline.read.shards import IMAGE_SUFFIXES, iter_samples

PAIR_SEPARATOR = "_"  # webdataset keys end at the first dot: `KEY_3`, never `KEY.3`


@dataclass
class PairCount:
    images: int = 0
    pairs: int = 0
    without_image: int = 0
    without_caption: int = 0


def caption_pairs(path, count: PairCount | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(pair key, {suffix: bytes}) for each caption of each sample of the shard at `path`, in order."""
    count = count if count is not None else PairCount()
    for key, members in iter_samples(path, {"txt", "json", *IMAGE_SUFFIXES}):
        count.images += 1
        suffix = next((s for s in IMAGE_SUFFIXES if s in members), None)
        captions = members.get("txt", b"").decode("utf-8").splitlines()
        if suffix is None:
            count.without_image += 1
            continue
        if not captions:
            count.without_caption += 1
            continue
        meta = json.loads(members["json"]) if "json" in members else {}
        listed = meta.get("captions") if isinstance(meta.get("captions"), list) else []
        ids = [c.get("id") for c in listed if isinstance(c, dict)]
        for number, caption in enumerate(captions):
            described = {"key": key, "caption": number, "caption_id": ids[number] if number < len(ids) else number}
            yield f"{key}{PAIR_SEPARATOR}{number}", {suffix: members[suffix], "txt": caption.encode("utf-8"),
                                                    "json": json.dumps(described).encode("utf-8")}
            count.pairs += 1


def write_pairs(path, stream: BinaryIO) -> PairCount:
    """The pairs of the shard at `path` as an uncompressed tar written to `stream` (not seekable: stdout)."""
    count = PairCount()
    with tarfile.open(fileobj=stream, mode="w|") as tar:
        for key, members in caption_pairs(path, count):
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mode, info.mtime = len(data), 0o444, 0
                tar.addfile(info, io.BytesIO(data))
    return count
