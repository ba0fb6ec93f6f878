"""Reading shards: samples from one tar, what one shard holds, and the fingerprint of a shard set."""

from __future__ import annotations

import hashlib
import json
import random
import tarfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trimodal.errors import ShardError
from trimodal.storage import filesystem, location, storage_errors

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")  # what img2dataset can write; our own shards use jpg and png


def iter_samples(path: Path, suffixes: set[str] | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: bytes}) for each sample of a webdataset tar, members grouped by key.

    The key is the member name up to its first dot (`KEY.3.wav` is suffix `3.wav` of `KEY`); with
    `suffixes`, only those members are read; the rest are skipped by seeking past them.
    """
    key, members = None, {}
    try:
        with _open_tar(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name.rsplit("/", 1)[-1]
                member_key, _, suffix = name.partition(".")
                if member_key != key:
                    if key is not None:
                        yield key, members
                    key, members = member_key, {}
                if suffixes is None or suffix in suffixes or _is_wav(suffix) and "wav" in suffixes:
                    members[suffix] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as error:
        raise ShardError(f"cannot read shard {path}: {error}") from error
    if key is not None:
        yield key, members


@dataclass(frozen=True)
class Extent:
    """Where a member's bytes lie in its tar: `read_member` fetches them alone (a range read in object storage)."""

    offset: int
    size: int


def iter_extents(path: Path, read: set[str] = frozenset()) -> Iterator[tuple[str, dict[str, Extent], dict[str, bytes]]]:
    """(key, {suffix: Extent} of every member, {suffix: bytes} of the members in `read`) for each sample."""
    key, extents, members = None, {}, {}
    try:
        with _open_tar(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, _, suffix = member.name.rsplit("/", 1)[-1].partition(".")
                if member_key != key:
                    if key is not None:
                        yield key, extents, members
                    key, extents, members = member_key, {}, {}
                extents[suffix] = Extent(member.offset_data, member.size)
                if suffix in read:
                    members[suffix] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as error:
        raise ShardError(f"cannot read shard {path}: {error}") from error
    if key is not None:
        yield key, extents, members


def read_member(path: Path, extent: Extent) -> bytes:
    """One member's bytes, read alone from its tar (local or in object storage)."""
    path = location(path)
    with storage_errors(f"reading shard {path}"), path.open("rb") as handle:
        handle.seek(extent.offset)
        data = handle.read(extent.size)
    if len(data) != extent.size:
        raise ShardError(f"{path} is shorter than its index says (a member at byte {extent.offset} is cut off)")
    return data


# Object storage is read in order, `READ_AHEAD` bytes at a time: a bounded read-ahead, not a copy.
READ_AHEAD = 8 << 20


@contextmanager
def _open_tar(path) -> Iterator[tarfile.TarFile]:
    """A local tar opened to seek past unwanted members; one in object storage streamed in order."""
    path = location(path)
    if isinstance(path, Path):
        with tarfile.open(path, mode="r:") as tar:
            yield tar
        return
    with storage_errors(f"reading shard {path}"):
        fs, fs_path = filesystem(path)
        handle = fs.open(fs_path, "rb", block_size=READ_AHEAD, cache_type="readahead")
        try:
            with tarfile.open(fileobj=handle, mode="r|") as tar:
                yield tar
        finally:
            handle.close()


@dataclass
class ShardContents:
    """What one shard holds, flattened in sample order: CSR-style counts say which rows own what."""

    keys: list[str] = field(default_factory=list)
    images: list[bytes | None] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    caption_ids: list[int] = field(default_factory=list)
    caption_counts: list[int] = field(default_factory=list)
    wavs: list[bytes] = field(default_factory=list)
    wav_caption_ids: list[int] = field(default_factory=list)
    wav_counts: list[int] = field(default_factory=list)

    def rows(self, start: int, stop: int) -> "ShardContents":
        """The samples [start, stop) of the shard, with their captions and spoken captions."""
        captions = offsets(self.caption_counts)
        wavs = offsets(self.wav_counts) if self.wav_counts else np.zeros(stop + 1, np.int64)  # audio not read
        c0, c1, w0, w1 = captions[start], captions[stop], wavs[start], wavs[stop]
        return ShardContents(self.keys[start:stop], self.images[start:stop], self.captions[c0:c1],
                             self.caption_ids[c0:c1], self.caption_counts[start:stop], self.wavs[w0:w1],
                             self.wav_caption_ids[w0:w1], self.wav_counts[start:stop])


def read_shard(path: Path, *, images: bool = True, audio: bool = True) -> ShardContents:
    """Keys, image bytes, captions (with their ids) and spoken captions of one shard, in order."""
    contents = ShardContents()
    wanted = {"json", "txt"} | (set(IMAGE_SUFFIXES) if images else set()) | ({"wav"} if audio else set())
    for key, members in iter_samples(path, wanted):
        contents.keys.append(key)
        if images:
            contents.images.append(next((members[s] for s in IMAGE_SUFFIXES if s in members), None))
        texts = members.get("txt", b"").decode("utf-8").splitlines()
        # Our KEY.json lists the captions; img2dataset's (adopted shards) describes the download instead.
        meta = json.loads(members["json"]) if "json" in members else {}
        meta = meta if isinstance(meta.get("captions"), list) else {"captions": []}
        ids = [caption["id"] for caption in meta["captions"]] or list(range(len(texts)))
        contents.captions += texts
        contents.caption_ids += ids[: len(texts)]
        contents.caption_counts.append(len(texts))
        if audio:  # member `<n>.wav` speaks caption n (line n of KEY.txt); KEY.json gives that caption's id
            caption_of = {caption["audio"]: caption["id"] for caption in meta["captions"] if caption.get("audio")}
            spoken = sorted((int(s.split(".")[0]), s) for s in members if _is_wav(s) and s.split(".")[0].isdigit())
            contents.wavs += [members[suffix] for _, suffix in spoken]
            contents.wav_caption_ids += [caption_of.get(suffix, number) for number, suffix in spoken]
            contents.wav_counts.append(len(spoken))
    return contents


def offsets(counts: Sequence[int]) -> np.ndarray:
    """CSR offsets (len(counts) + 1,) from per-row counts."""
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)


def _is_wav(suffix: str) -> bool:
    return suffix.endswith((".wav", ".flac"))


def index_fingerprint(index: dict, splits: Sequence[str] | None = None) -> str:
    """A digest of what the shards hold (names, sizes, sha256s), not of index.json's formatting."""
    described = []
    for split, info in sorted(index["splits"].items()):
        if splits is None or split in splits:
            described += [[split, s["name"], s["sha256"], s["samples"], s["captions"], s["utterances"]]
                          for s in info["shards"]]
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()
