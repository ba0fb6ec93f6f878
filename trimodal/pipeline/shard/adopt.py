"""Adopting webdataset tars that already hold one sample per image (img2dataset's output) as our shards.

img2dataset writes `KEY.jpg` / `KEY.txt` / `KEY.json` per image, which is what `mm featurize` and
`mm train` read, so the tars are linked into OUT (a hard link; a symbolic link across file systems)
instead of copied, and `OUT/index.json` describes them: counts, sha256, key ranges. Each tar is read once
to count and check it; a sidecar per shard remembers the source's size and mtime, so a rerun rereads
only what changed. A tar with a sample that lacks an image or a caption is the one case that is
rewritten (without those samples, listed under `skipped`): no reader may see a half sample.

Either side may be in object storage (`trimodal.storage`), where there are no links: each tar is then
copied as it is read (the one read that checks it), and appears in OUT whole or not at all.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from trimodal import __version__
from trimodal.atomic import write_json
from trimodal.errors import DatasetLayoutError, ShardError
from trimodal.pipeline.base.samples import key_problem
from trimodal.pipeline.read.shards import IMAGE_SUFFIXES
from trimodal.pipeline.shard.writer import SIDECARS, ShardOptions, TarStream, read_sidecar, remove_stale
from trimodal.pipeline.read.index import FORMAT, INDEX
from trimodal.progress import SILENT, Reporter
from trimodal.storage import StoragePath, absolute, is_remote, listing, location, make_folder, open_atomic, prepare_folder

_MAGIC = {"jpg": (b"\xff\xd8",), "jpeg": (b"\xff\xd8",), "png": (b"\x89PNG",), "webp": (b"RIFF",)}
_CHUNK = 1 << 20


@dataclass(frozen=True)
class _Source:
    split: str
    name: str  # our shard name, `<split>-%06d.tar`
    path: StoragePath  # the adopted tar

    def stat(self) -> list:
        info = self.path.stat()
        return [str(absolute(self.path)), info.st_size, info.st_mtime_ns]


def find_tars(folder: StoragePath) -> list[StoragePath]:
    """img2dataset's finished tars in one output folder, in shard order (`00000.tar`, `00001.tar`, …).

    img2dataset writes `K_stats.json` after `K.tar`: where the folder has stats files, a tar without one
    is being written or was cut off by an interruption, and is left out (see `unfinished_tars`). A
    folder with no stats file at all (tars copied without them) is taken as it is."""
    folder = location(folder)
    tars = listing(folder, "*.tar")
    stats = {path.name for path in listing(folder, "*_stats.json")}
    if stats:
        return [path for path in tars if f"{path.stem}_stats.json" in stats]
    return tars


def unfinished_tars(folder: StoragePath) -> list[StoragePath]:
    finished = {str(path) for path in find_tars(folder)}
    return [path for path in listing(location(folder), "*.tar") if str(path) not in finished]


def adopt_splits(dataset: str, folders: dict[str, StoragePath], out: StoragePath, options: ShardOptions = ShardOptions(), *,
                 reporter: Reporter = SILENT) -> dict:
    """Describe the tars of `folders` (split -> img2dataset output folder) in `out/index.json`, linked in."""
    options.check()
    out = location(out)
    sources = []
    for split, folder in folders.items():
        for number, path in enumerate(find_tars(folder)):
            sources.append(_Source(split, f"{split}-{number:06d}.tar", path))
    if not sources:
        where = ", ".join(str(folder) for folder in folders.values())
        raise DatasetLayoutError(f"no webdataset tars (*.tar) in {where}: nothing to adopt "
                                 f"(for cc3m, run `mm download cc3m` first)")
    prepare_folder(out)
    make_folder(out / SIDECARS)
    (out / INDEX).unlink(missing_ok=True)
    remove_stale(out, {source.name for source in sources})

    records = []
    total = sum(source.path.stat().st_size for source in sources)
    with reporter.task(f"adopt {dataset}", total=total, unit="bytes") as task:
        for source in sources:
            record = _completed(out, source)
            if record is None:
                record = _adopt(source, out, task.advance)
            else:
                task.advance(source.path.stat().st_size)
            records.append(record)

    index = _index(dataset, folders, sources, records, options)
    planned = index["totals"]["planned_samples"]
    bad = index["totals"]["bad_samples"]
    if planned and bad / planned > options.max_bad:
        examples = "; ".join(f"{s['key']} in {s['file']}: {s['reason']}" for s in index["skipped"][:10])
        raise ShardError(f"too many bad samples: {bad} of {planned} ({bad / planned:.2%}) lack an image or a caption, "
                         f"more than --max-bad {options.max_bad}; no {INDEX} written. Bad: {examples}")
    overlaps = _overlapping_key_ranges(index)
    if overlaps:
        raise ShardError(f"the key ranges of {', '.join(overlaps[:5])} overlap, so sample keys may repeat within "
                         "a split; the tars of one split must come from one img2dataset run (and its retries)")
    write_json(out / INDEX, index)
    return index


def _completed(out: StoragePath, source: _Source) -> dict | None:
    record = read_sidecar(out, source.name)
    return record if record is not None and record.get("source") == source.stat() else None


class _HashingReader:
    """A file object that hashes what tarfile reads through it (one pass: check and sha256 together)."""

    def __init__(self, raw, advance, sink=None):
        self._raw, self.sha256, self._advance, self._sink = raw, hashlib.sha256(), advance, sink
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.sha256.update(data)
        self.size += len(data)
        if self._sink is not None:
            self._sink.write(data)
        self._advance(len(data))
        return data


class _HasBadSamples(Exception):
    """A copy made while reading would hold incomplete samples: it is discarded (see `_copied`)."""


def _adopt(source: _Source, out: StoragePath, advance) -> dict:
    target = out / source.name
    linkable = not is_remote(source.path) and not is_remote(out)
    if linkable:
        samples, bad, sha256, size = _read(source, advance)
    else:  # object storage has no links: a copy, written as the tar is read
        samples, bad, sha256, size = _copied(source, target, advance)
    if bad:
        how, entry = "copy", _rewrite(source, samples, target)
    else:
        how = _link(source.path, target) if linkable else "copy"
        entry = {"name": source.name, "samples": len(samples), "captions": sum(s[1] for s in samples),
                 "utterances": 0, "bytes": size, "sha256": sha256,
                 "first_key": samples[0][0] if samples else None, "last_key": samples[-1][0] if samples else None}
    entry["adopted_from"] = str(absolute(source.path))
    entry["adopted_by"] = how
    keys = sorted(key for key, _ in samples)
    entry["min_key"], entry["max_key"] = (keys[0], keys[-1]) if keys else (None, None)
    record = {"source": source.stat(), "split": source.split, "entry": entry, "skipped": bad}
    write_json(out / SIDECARS / (source.name + ".json"), record)
    return record


def _copied(source: _Source, target: StoragePath, advance) -> tuple[list[tuple[str, int]], list[dict], str, int]:
    """`_read`, writing the tar's bytes to `target` as they come; a tar with incomplete samples leaves
    nothing under `target` (its copy is discarded: `_rewrite` writes what may be read)."""
    try:
        with open_atomic(target) as sink:
            samples, bad, sha256, size = _read(source, advance, sink)
            if bad:
                raise _HasBadSamples
    except _HasBadSamples:
        pass
    except OSError as error:
        raise ShardError(f"cannot write {target}: {getattr(error, 'strerror', None) or error}") from error
    return samples, bad, sha256, size


def _read(source: _Source, advance, sink=None) -> tuple[list[tuple[str, int]], list[dict], str, int]:
    """[(key, captions)] of the complete samples, the incomplete ones, the tar's sha256 and its size: one
    read (its bytes also written to `sink` when given)."""
    samples, bad = [], []
    seen: set[str] = set()
    current: dict[str, bytes] = {}
    key = None

    def finish():
        if key is None:
            return
        image = next((suffix for suffix in IMAGE_SUFFIXES if suffix in current), None)
        caption = current.get("txt", b"").decode("utf-8", errors="replace")
        why = key_problem(key)
        if why is None and image is None:
            why = "no image member"
        elif why is None and not current[image].startswith(_MAGIC[image]):
            why = f"{key}.{image} is not a {image} file"
        elif why is None and not caption.strip():
            why = "no caption (empty or missing .txt)"
        if why:
            bad.append({"key": key, "file": source.path.name, "reason": why})
        elif key in seen:
            raise ShardError(f"{source.path}: sample key {key} occurs twice; the tar is not a webdataset shard")
        else:
            seen.add(key)
            samples.append((key, len(caption.splitlines()) or 1))

    try:
        with source.path.open("rb") as raw:
            reader = _HashingReader(raw, advance, sink)
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    member_key, _, suffix = member.name.rsplit("/", 1)[-1].partition(".")
                    if member_key != key:
                        finish()
                        key, current = member_key, {}
                    wanted = suffix == "txt" or suffix in IMAGE_SUFFIXES
                    current[suffix] = tar.extractfile(member).read(16 if suffix != "txt" else -1) if wanted else b""
                finish()
            while reader.read(_CHUNK):  # the end-of-archive padding belongs to the digest too
                pass
    except (tarfile.TarError, OSError, EOFError, UnicodeError) as error:
        raise ShardError(f"cannot read {source.path}: {error}; the tar is damaged (download it again)") from error
    return samples, bad, reader.sha256.hexdigest(), reader.size


def _link(source: Path, target: Path) -> str:
    """A hard link where the file system allows one, else a symbolic link: never a copy of the bytes."""
    temporary = target.with_name(target.name + ".tmp")
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
        how = "hardlink"
    except OSError:
        os.symlink(source.resolve(), temporary)
        how = "symlink"
    try:
        os.replace(temporary, target)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise ShardError(f"cannot write {target}: {error.strerror or error}") from error
    return how


def _rewrite(source: _Source, samples: list[tuple[str, int]], target: StoragePath) -> dict:
    """A copy of the tar with only the complete samples (members in their original order)."""
    keep = {key for key, _ in samples}
    try:
        with (open_atomic(target) as raw, source.path.open("rb") as tar_bytes,
              tarfile.open(fileobj=tar_bytes, mode="r|") as tar):
            stream = TarStream(raw)
            for member in tar:
                if member.isfile() and member.name.rsplit("/", 1)[-1].partition(".")[0] in keep:
                    stream.add(member.name.rsplit("/", 1)[-1], tar.extractfile(member).read())
            stream.close()
    except (OSError, tarfile.TarError) as error:
        raise ShardError(f"cannot write {target}: {getattr(error, 'strerror', None) or error}") from error
    return {"name": source.name, "samples": len(samples), "captions": sum(s[1] for s in samples), "utterances": 0,
            "bytes": stream.size, "sha256": stream.sha256.hexdigest(),
            "first_key": samples[0][0] if samples else None, "last_key": samples[-1][0] if samples else None}


def _overlapping_key_ranges(index: dict) -> list[str]:
    """Shards whose [min_key, max_key] ranges overlap within a split. img2dataset numbers keys by shard
    (shard * 10^k + row), so disjoint ranges prove keys unique without holding every key in memory;
    within a shard, reading checked them."""
    overlapping = []
    for split, info in index["splits"].items():
        ranges = sorted((s["min_key"], s["max_key"], s["name"]) for s in info["shards"] if s["samples"])
        for (_, high, name), (low, _, following) in zip(ranges, ranges[1:]):
            if low <= high:
                overlapping.append(f"{name} and {following}")
    return overlapping


def _index(dataset: str, folders: dict[str, StoragePath], sources: list[_Source], records: list[dict],
           options: ShardOptions) -> dict:
    splits: dict[str, dict] = {}
    skipped = []
    for source, record in zip(sources, records):
        split = splits.setdefault(source.split, {"samples": 0, "captions": 0, "utterances": 0, "shards": []})
        for what in ("samples", "captions"):
            split[what] += record["entry"][what]
        split["shards"].append(record["entry"])
        skipped += [{"split": source.split, **entry} for entry in record["skipped"]]
    samples = sum(split["samples"] for split in splits.values())
    return {
        "format": FORMAT,
        "dataset": dataset,
        "created_with": f"trimodal {__version__}",
        # Adopted tars keep img2dataset's shard sizes and sample order: only --max-bad applies.
        "args": {"adopted": True, "max_bad": options.max_bad},
        "source": {"root": str(absolute(next(iter(folders.values()))).parent),
                   "folders": {split: str(absolute(folder)) for split, folder in folders.items()},
                   "dataset_dir": str(absolute(next(iter(folders.values()))).parent), "audio": None,
                   "audio_dir": None},
        "modalities": ["image", "text"],
        "splits": splits,
        "totals": {"planned_samples": samples + len(skipped), "bad_samples": len(skipped),
                   "planned_utterances": 0, "bad_utterances": 0},
        "skipped": skipped,
        # Tars img2dataset had not finished (no stats file) are not adopted: said here, not dropped silently.
        "annotation_problems": [f"{path}: no {path.stem}_stats.json, so img2dataset had not finished it; not adopted "
                                "(run the download again to finish it)"
                                for folder in folders.values() for path in unfinished_tars(folder)],
    }
