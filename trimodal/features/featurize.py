"""`mm featurize`: every feature computed once, per shard, into the zarr store; resumable per shard.

Three stages overlap, joined by queues one shard deep: a reader thread reads shard N+1 (and on CUDA
decodes and crops its jpgs on the device), this thread computes shard N, and a writer thread writes shard
N-1 into the store. Shards are written in order, so the mel array grows and `frames_committed` advances
shard by shard; a failure in any stage stops all three and is raised here, shards already written kept.

Under torchrun each rank computes its own share of the shards that are not done yet (balanced by
samples), on its own device, into per-shard parts beside the store (`parts.py`); once every rank is
through, rank 0 writes the parts into the store in shard order, exactly as one process would have.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from trimodal import distributed
from trimodal.errors import ConfigError, ShardError, TrimodalError
from trimodal.features.audio import decode_wav, make_audio_extractor
from trimodal.features.decode import device_pixels
from trimodal.features.image import make_image_extractor
from trimodal.features.overlap import Ahead, Behind
from trimodal.features.parts import Parts
from trimodal.features.store import FeatureStore, ShardFeatures, ShardSlot, StaleCacheError, config_differences, plan_layout
from trimodal.features.text import make_text_extractors
from trimodal.pipeline.base.samples import SPLITS
from trimodal.pipeline.read.index import read_index
from trimodal.pipeline.read.shards import ShardContents, index_fingerprint, offsets, read_shard
from trimodal.storage import location, remove_tree
from trimodal.progress import SILENT, Reporter


_AUDIO_WINDOW = 512  # utterances decoded at once


@dataclass(frozen=True)
class FeaturizeOptions:
    audio: str | None = "mel80"
    image: str | None = "auto"  # see make_image_extractor
    image_tokens: bool = False
    text: str | None = "auto"  # see make_text_extractors
    text_tokens: bool = False
    splits: tuple[str, ...] | None = None
    device: str = "auto"
    batch_size: int = 64
    workers: int = 2
    overwrite: bool = False
    # Under torchrun: how long a rank that finished its shards waits for the others (a rank that died ends
    # the job at once; one that stalls, after this).
    dist_timeout_s: float = 3600.0


@dataclass
class FeaturizeSummary:
    store: Path
    device: str
    shards_written: list[str] = field(default_factory=list)
    shards_skipped: list[str] = field(default_factory=list)
    parts_reused: list[str] = field(default_factory=list)  # computed by an interrupted distributed run
    rows: int = 0
    captions: int = 0
    utterances: int = 0
    frames: int = 0
    random_init: bool = False  # the image tower
    random_towers: list[str] = field(default_factory=list)  # every tower running with random weights
    config: dict = field(default_factory=dict)


class _Extractors:
    def __init__(self, options: FeaturizeOptions, index: dict, shards: Path, device: torch.device):
        has_audio = options.audio and "audio" in index.get("modalities", [])
        self.mel = make_audio_extractor(options.audio, device) if has_audio else None  # log-mels or a speech tower
        self.image = make_image_extractor(options.image, device, tokens=options.image_tokens, index=index,
                                          shards=shards)
        self.text, self.text_tower = make_text_extractors(options.text, device, tokens=options.text_tokens)
        # On CUDA the reader thread decodes and crops jpgs on the device; elsewhere PIL on the pool.
        self.device_pixels = device_pixels(self.image, device)

    @property
    def pixels(self) -> bool:
        return bool(self.image and self.image.needs_pixels)

    def config(self) -> dict:
        text = self.text.attrs() if self.text else None
        if self.text_tower:
            text["tower"] = self.text_tower.attrs()
        return {"image": self.image.attrs() if self.image else None, "text": text,
                "audio": self.mel.attrs() if self.mel else None}

    def random_towers(self) -> list[str]:
        towers = {"image": self.image, "text": self.text_tower, "speech": self.mel}
        return [f"{kind} tower {tower.spec}" for kind, tower in towers.items()
                if tower is not None and getattr(tower, "random_init", False)]

    def dims(self) -> dict:
        dims = {}
        if self.image:
            dims["image_dim"] = self.image.embed_dim
            if self.image.tokens:
                dims["image_tokens"] = self.image.token_shape()
        if self.text:
            dims["context_length"] = self.text.context_length
        if self.text_tower:
            dims["text_dim"] = self.text_tower.embed_dim
            dims["text_states"] = self.text_tower.token_shape()
        return dims


@dataclass
class _ReadShard:
    """One shard as the reader thread hands it over: its contents, and on the device path its image crops."""

    path: Path
    contents: ShardContents
    crops: torch.Tensor | None = None


def featurize(shards: Path, store_path: Path, options: FeaturizeOptions = FeaturizeOptions(), *,
              reporter: Reporter = SILENT, stop_after: int | None = None) -> FeaturizeSummary:
    """Compute the features of every shard of `shards` (or of `options.splits`) into `store_path`, in this
    process or, under torchrun, as one rank of many.

    `stop_after` ends the run after that many shards were computed (tests use it to interrupt).
    """
    if options.batch_size < 1 or options.workers < 1:
        raise ConfigError("--batch-size and --workers must be at least 1")
    with distributed.session(options.device, timeout_s=options.dist_timeout_s) as dist:
        return _featurize(location(shards), location(store_path), options, dist, reporter if dist.main else SILENT, stop_after)


def _featurize(shards: Path, store_path: Path, options: FeaturizeOptions, dist: distributed.Dist, reporter: Reporter,
               stop_after: int | None) -> FeaturizeSummary:
    index = read_index(shards)
    splits = _choose_splits(index, options.splits)
    extractors = _Extractors(options, index, shards, dist.device)
    config = {**extractors.config(), "splits": splits}
    fingerprint = index_fingerprint(index, splits)

    parts = Parts(store_path)

    def open_store() -> list[str]:
        """Rank 0: the store opened (or created, with the parts of any earlier run removed), and which of
        its missing shards an interrupted distributed run left complete parts of."""
        try:
            store = _open_or_create(store_path, shards, index, splits, config, fingerprint, extractors,
                                    options.overwrite, parts)
        except OSError as error:  # a full disk or an unwritable path: nothing was complete, so nothing is kept
            remove_tree(store_path)
            raise TrimodalError(f"cannot create the feature store {store_path}: {error.strerror or error}") from error
        return [slot.name for slot in store.slots.values() if not slot.done and parts.complete(slot.name)]

    reused = distributed.on_main(open_store, "opening the feature store")
    store = FeatureStore.open(store_path, mode="a" if dist.main else "r")
    summary = FeaturizeSummary(store_path, str(dist.device), random_init=bool(extractors.image and extractors.image.random_init),
                               random_towers=extractors.random_towers(), config=config, parts_reused=reused)
    slots = list(store.slots.values())
    summary.shards_skipped = [slot.name for slot in slots if slot.done]
    todo = [slot for slot in slots if not slot.done]
    entries = {s["name"]: s for split in splits for s in index["splits"][split]["shards"]}
    # Ranks write parts (see parts.py); one process writes into the store directly, unless an interrupted
    # distributed run left parts to finish from.
    through_parts = dist.enabled or bool(reused)
    mine = _deal(todo, dist.rank, dist.world_size) if dist.enabled else todo
    mine = [slot for slot in mine if slot.name not in reused]
    if through_parts:
        def keep(slot: ShardSlot, features: ShardFeatures) -> None:
            parts.write(slot.name, features)
    else:
        def keep(slot: ShardSlot, features: ShardFeatures) -> None:
            _write_into(store, store_path, slot, features)

    _compute(shards, mine[:stop_after], entries, extractors, options, reporter, keep,
             done=sum(s.rows[1] - s.rows[0] for s in slots) - sum(s.rows[1] - s.rows[0] for s in mine),
             total=sum(s.rows[1] - s.rows[0] for s in slots))
    summary.shards_written = [slot.name for slot in mine[:stop_after]]
    if through_parts:
        if stop_after is not None:
            return summary
        distributed.barrier("waiting for the other ranks to compute their shards")
        if not dist.main:
            return summary
        summary.shards_written = _assemble(store, store_path, todo, parts, reporter)
    counts = store.group.attrs["counts"]
    summary.rows, summary.captions, summary.utterances = counts["rows"], counts["captions"], counts["utterances"]
    summary.frames = int(store.group.attrs["frames_committed"])
    return summary


def _deal(slots: list[ShardSlot], rank: int, world_size: int) -> list[ShardSlot]:
    """Rank `rank`'s share of `slots`: the largest first, each to the rank with the fewest samples so far
    (the same answer on every rank); kept in shard order."""
    load, owner = [0] * world_size, {}
    for slot in sorted(slots, key=lambda s: (-(s.rows[1] - s.rows[0]), s.name)):
        chosen = min(range(world_size), key=lambda r: (load[r], r))
        owner[slot.name] = chosen
        load[chosen] += slot.rows[1] - slot.rows[0]
    return [slot for slot in slots if owner[slot.name] == rank]


def _write_into(store: FeatureStore, store_path: Path, slot: ShardSlot, features: ShardFeatures) -> None:
    try:
        store.write_shard(slot, features)
    except OSError as error:
        # The slot is marked complete only after its arrays, so a rerun redoes just this shard.
        raise TrimodalError(f"cannot write {slot.name}'s features into {store_path}: {error.strerror or error}; "
                            "shards already written are kept, run the same command again to continue") from error


def _assemble(store: FeatureStore, store_path: Path, slots: list[ShardSlot], parts: Parts, reporter: Reporter) -> list[str]:
    """Rank 0, after every rank finished: the parts into the store, in shard order."""
    with reporter.task("assemble the ranks' parts", total=len(slots), unit="shards") as task:
        for slot in slots:
            _write_into(store, store_path, slot, parts.read(slot.name))
            parts.remove(slot.name)
            task.advance()
    parts.finish()
    return [slot.name for slot in slots]


def _compute(shards: Path, slots: list[ShardSlot], entries: dict, extractors: "_Extractors", options: FeaturizeOptions,
             reporter: Reporter, keep, *, done: int, total: int) -> None:
    """The overlapped pipeline over `slots`: read ahead, compute here, `keep(slot, features)` behind."""

    def read(slot: ShardSlot) -> _ReadShard:
        return _read_shard(shards / slot.name, entries[slot.name], extractors)

    with reporter.task("featurize", total=total, unit="samples") as task, ThreadPoolExecutor(options.workers) as pool:
        task.advance(done)
        with Ahead(slots, read, name="featurize-reader") as reader, \
                Behind(lambda job: keep(*job), name="featurize-writer") as writer:
            for slot, shard in zip(slots, reader):
                writer.submit((slot, _featurize_shard(shard, extractors, options.batch_size, pool, task.advance)))


def _choose_splits(index: dict, wanted: tuple[str, ...] | None) -> list[str]:
    available = [split for split in SPLITS if split in index["splits"]] + \
        [split for split in index["splits"] if split not in SPLITS]
    if wanted is None:
        return available
    unknown = [split for split in wanted if split not in index["splits"]]
    if unknown:
        raise ConfigError(f"--splits names {', '.join(unknown)}, but the shards have {', '.join(available)}")
    return [split for split in available if split in wanted]


def _open_or_create(path: Path, shards: Path, index: dict, splits: list[str], config: dict, fingerprint: str,
                    extractors: _Extractors, overwrite: bool, parts: Parts) -> FeatureStore:
    if path.exists() and not overwrite:
        store = FeatureStore.open(path, mode="a")
        differences = config_differences(json.loads(json.dumps(store.config)), json.loads(json.dumps(config)))
        if differences:
            raise StaleCacheError(f"{path} was written with other settings: {'; '.join(differences[:4])}"
                                  f"{' …' if len(differences) > 4 else ''}; use --overwrite to recompute")
        if store.fingerprint != fingerprint:
            raise StaleCacheError(f"{path} was computed from other shards (the shards' index.json changed since); "
                                  "use --overwrite to recompute")
        return store
    parts.finish()  # parts of another store (other settings, other shards) must not land in this one
    return FeatureStore.create(path, slots=plan_layout(index, splits), config=config, fingerprint=fingerprint,
                               shards_path=shards, dims=extractors.dims())


def _read_shard(path: Path, entry: dict, extractors: _Extractors) -> _ReadShard:
    """The reader thread's part: the shard's members, checked against index.json; on CUDA its image crops."""
    contents = read_shard(path, images=extractors.pixels, audio=extractors.mel is not None)
    expected = (entry["samples"], entry["captions"], entry["utterances"] if extractors.mel else len(contents.wavs))
    found = (len(contents.keys), len(contents.captions), len(contents.wavs))
    if found != expected or len(set(contents.keys)) != len(contents.keys):
        raise ShardError(f"{path} does not match its index.json entry (samples, captions, utterances: "
                         f"found {found}, index says {expected}); run `mm shard` again")
    if extractors.pixels and any(blob is None for blob in contents.images):
        raise ShardError(f"{path}: a sample has no image member")
    shard = _ReadShard(path, contents)
    if extractors.device_pixels is not None:
        shard.crops = extractors.device_pixels.crops(contents.images)
        contents.images = []  # the bytes are done with; the crops are what the tower needs
    return shard


def _featurize_shard(shard: _ReadShard, extractors: _Extractors, batch_size: int, pool: ThreadPoolExecutor,
                     advance) -> ShardFeatures:
    contents = shard.contents
    keys = contents.keys
    features = ShardFeatures(keys=keys)
    # Progress counts samples; images and audio each carry a share of every sample.
    stages = [stage for stage in (extractors.image, extractors.mel) if stage]
    share = len(keys) / max(1, len(stages))
    if extractors.image:
        features.image, features.image_tokens = _image_features(shard, extractors, batch_size, pool,
                                                                lambda n: advance(share * n / max(1, len(keys))))
    if extractors.text:
        features.tokens = extractors.text(contents.captions)
        features.caption_ids = np.asarray(contents.caption_ids, dtype=np.int32)
        features.caption_offsets = offsets(contents.caption_counts)
        if extractors.text_tower:
            features.text_embedding, features.text_states = extractors.text_tower(features.tokens, batch_size)
    if extractors.mel:
        mels = _mel_features(contents.wavs, extractors.mel, batch_size, pool,
                             lambda n: advance(share * n / len(contents.wavs)))
        if not contents.wavs:
            advance(share)
        features.mel = np.concatenate(mels) if mels else np.zeros((0, extractors.mel.frame_dim), np.float16)
        features.frame_offsets = offsets([len(m) for m in mels])
        features.utterance_offsets = offsets(contents.wav_counts)
        features.utterance_caption_ids = np.asarray(contents.wav_caption_ids, dtype=np.int32)
    if not stages:
        advance(len(keys))
    return features


def _image_features(shard: _ReadShard, extractors: _Extractors, batch_size: int, pool: ThreadPoolExecutor,
                    advance) -> tuple[np.ndarray, np.ndarray | None]:
    image, keys = extractors.image, shard.contents.keys
    if not image.needs_pixels:
        embeddings = image.embed_keys(keys)
        if embeddings.shape != (len(keys), image.embed_dim):
            raise TrimodalError(f"{shard.path}: the precomputed image features gave shape {embeddings.shape} for "
                                f"{len(keys)} samples of width {image.embed_dim}")
        advance(len(keys))
        return embeddings, None
    if shard.crops is not None:  # the device path: cropped on the device by the reader thread
        batches = (extractors.device_pixels.normalize(shard.crops[start : start + batch_size])
                   for start in range(0, len(keys), batch_size))
    else:
        batches = _pil_batches(shard.contents.images, image, batch_size, pool)
    pooled, tokens = [], []
    for pixels in batches:
        batch_pooled, batch_tokens = image.encode_pixels(pixels)
        pooled.append(batch_pooled)
        if batch_tokens is not None:
            tokens.append(batch_tokens)
        advance(len(batch_pooled))
    return (np.concatenate(pooled) if pooled else np.zeros((0, image.embed_dim), np.float32),
            np.concatenate(tokens) if tokens else None)


def _pil_batches(blobs: list[bytes], image, batch_size: int, pool: ThreadPoolExecutor):
    """Preprocessed batches, PIL decoding the next batch on the pool while the tower runs on this one."""
    chunks = [blobs[start : start + batch_size] for start in range(0, len(blobs), batch_size)]
    decode = lambda blob: image.pixels([blob])[0]  # noqa: E731
    pending = [pool.submit(decode, blob) for blob in chunks[0]] if chunks else []
    for number in range(len(chunks)):
        pixels = torch.stack([future.result() for future in pending])
        pending = [pool.submit(decode, blob) for blob in chunks[number + 1]] if number + 1 < len(chunks) else []
        yield pixels


def _mel_features(wavs: list[bytes], mel, batch_size: int, pool: ThreadPoolExecutor,
                  advance) -> list[np.ndarray]:
    """float16 audio frames (log-mels, or a speech tower's states) of every utterance, in order."""
    load = lambda blob: mel.resample(*decode_wav(blob))  # noqa: E731  (moved to the mel device there)
    # Decoded waveforms are float32 (twice their wav bytes), so a shard is decoded a window at a time;
    # the pool decodes the next window while this one is featurised.
    windows = [wavs[start : start + _AUDIO_WINDOW] for start in range(0, len(wavs), _AUDIO_WINDOW)]
    pending = [pool.submit(load, blob) for blob in windows[0]] if windows else []
    mels: list[np.ndarray] = []
    for number in range(len(windows)):
        waveforms = [future.result() for future in pending]
        pending = [pool.submit(load, blob) for blob in windows[number + 1]] if number + 1 < len(windows) else []
        mels += mel.batched(waveforms, batch_size, on_batch=advance, dtype=torch.float16)
    return mels
