"""Shards written in one pass over a stream of samples, for sources too large to list in memory.

`mm shard` plans most datasets from a full listing; a source of millions of rows (BabyLM's captions)
instead yields samples one at a time, already assigned to a split. Each split fills `<split>-%06d.tar`
files in turn, rolling over at --max-samples or --max-mb, so the shard boundaries follow from the
stream and the options alone. A sidecar per finished shard records the plan's fingerprint: a rerun
with the same inputs and options reads the stream again but rewrites only shards without one.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field

from trimodal.atomic import write_json
from trimodal.errors import ShardError, StorageError
from trimodal.pipeline.shard.writer import SIDECARS, ShardOptions, TarStream, read_sidecar, remove_stale
from trimodal.storage import StoragePath, location, make_folder, open_atomic, prepare_folder


@dataclass
class StreamedSample:
    split: str
    key: str
    members: list[tuple[str, bytes]]  # (member name, payload), KEY.* in order
    captions: int = 1


@dataclass
class _Open:
    name: str
    samples: int = 0
    captions: int = 0
    bytes: int = 0
    first_key: str | None = None
    last_key: str | None = None
    stream: TarStream | None = None  # None while passing over a shard a previous run finished
    raw: object = None  # the shard's file, written through `open_atomic` (held open by `held`)
    held: ExitStack | None = None
    recorded: dict | None = None


@dataclass
class StreamResult:
    splits: dict[str, dict] = field(default_factory=dict)  # as index.json's "splits"
    written: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


class StreamShardWriter:
    """Write the samples of `stream` into `out`, one open shard per split; `close()` returns the result."""

    def __init__(self, out: StoragePath, options: ShardOptions, fingerprint: str):
        self.out, self.options, self.fingerprint = location(out), options, fingerprint
        prepare_folder(self.out)
        make_folder(self.out / SIDECARS)
        self._open: dict[str, _Open] = {}
        self._numbers: dict[str, int] = {}
        self.result = StreamResult()

    def write_all(self, stream: Iterable[StreamedSample], advance=lambda n: None) -> StreamResult:
        try:
            for sample in stream:
                self.add(sample)
                advance(1)
            for split in list(self._open):
                self._finish(split)
        except BaseException as error:
            for shard in self._open.values():  # an error mid-shard: nothing appears under its name
                if shard.held is not None:
                    shard.held.__exit__(type(error), error, error.__traceback__)
            raise
        remove_stale(self.out, {s["name"] for split in self.result.splits.values() for s in split["shards"]})
        return self.result

    def add(self, sample: StreamedSample) -> None:
        shard = self._open.get(sample.split) or self._start(sample.split)
        size = sum(512 + -(-len(data) // 512) * 512 for _, data in sample.members)
        full = (shard.samples >= shard.recorded["entry"]["samples"]) if shard.recorded else \
            shard.samples and (shard.samples >= self.options.max_samples or shard.bytes + size > self.options.max_mb * 1e6)
        if full:
            self._finish(sample.split)
            shard = self._start(sample.split)
        if shard.stream is not None:
            for name, data in sample.members:
                try:
                    shard.stream.add(name, data)
                except OSError as error:
                    raise ShardError(f"cannot write {self.out / shard.name}: {error.strerror or error}; the shards "
                                     "already finished are kept, run the same command again to continue") from error
        shard.samples += 1
        shard.captions += sample.captions
        shard.bytes += size
        shard.first_key = shard.first_key or sample.key
        shard.last_key = sample.key

    def _start(self, split: str) -> _Open:
        number = self._numbers.get(split, 0)
        self._numbers[split] = number + 1
        name = f"{split}-{number:06d}.tar"
        record = read_sidecar(self.out, name)
        shard = _Open(name)
        if record is not None and record.get("fingerprint") == self.fingerprint:
            shard.recorded = record
        else:
            shard.held = ExitStack()
            try:
                shard.raw = shard.held.enter_context(open_atomic(self.out / name))
            except (OSError, StorageError) as error:
                raise ShardError(f"cannot write {self.out / name}: {getattr(error, 'strerror', None) or error}") \
                    from error
            shard.stream = TarStream(shard.raw)
        self._open[split] = shard
        return shard

    def _finish(self, split: str) -> None:
        shard = self._open.pop(split)
        if shard.recorded is not None:
            entry = shard.recorded["entry"]
            self.result.kept.append(shard.name)
        else:
            try:
                shard.stream.close()
                held, shard.held = shard.held, None
                held.close()  # the shard appears under its name, whole
            except (OSError, StorageError) as error:
                raise ShardError(f"cannot write {self.out / shard.name}: {error.strerror or error}; the shards "
                                 "already finished are kept, run the same command again to continue") from error
            entry = {"name": shard.name, "samples": shard.samples, "captions": shard.captions, "utterances": 0,
                     "bytes": shard.stream.size, "sha256": shard.stream.sha256.hexdigest(),
                     "first_key": shard.first_key, "last_key": shard.last_key}
            write_json(self.out / SIDECARS / (shard.name + ".json"),
                       {"fingerprint": self.fingerprint, "split": split, "entry": entry})
            self.result.written.append(shard.name)
        info = self.result.splits.setdefault(split, {"samples": 0, "captions": 0, "utterances": 0, "shards": []})
        info["samples"] += entry["samples"]
        info["captions"] += entry["captions"]
        info["shards"].append(entry)
