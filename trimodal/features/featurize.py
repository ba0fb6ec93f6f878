"""`mm featurize`: every feature computed once, per shard, into the zarr store; resumable per shard."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from trimodal.errors import ConfigError, ShardError, TrimodalError
from trimodal.features.audio import MelExtractor, decode_wav, mel_config
from trimodal.features.image import OpenClipImageEncoder, parse_encoder, resolve_device
from trimodal.features.store import FeatureStore, ShardFeatures, StaleCacheError, config_differences, plan_layout
from trimodal.features.text import OpenClipTokenizer
from trimodal.pipeline.samples import SPLITS
from trimodal.pipeline.shard import read_index
from trimodal.pipeline.stream import index_fingerprint, offsets, read_shard
from trimodal.progress import SILENT, Reporter


_AUDIO_WINDOW = 512  # utterances decoded at once


@dataclass(frozen=True)
class FeaturizeOptions:
    audio: str | None = "mel80"
    image: str | None = "open_clip:ViT-B-32"
    image_tokens: bool = False
    text: str | None = "open_clip:ViT-B-32"
    splits: tuple[str, ...] | None = None
    device: str = "auto"
    batch_size: int = 64
    workers: int = 2
    overwrite: bool = False


@dataclass
class FeaturizeSummary:
    store: Path
    device: str
    shards_written: list[str] = field(default_factory=list)
    shards_skipped: list[str] = field(default_factory=list)
    rows: int = 0
    captions: int = 0
    utterances: int = 0
    frames: int = 0
    random_init: bool = False
    config: dict = field(default_factory=dict)


class _Extractors:
    def __init__(self, options: FeaturizeOptions, index: dict, device: torch.device):
        self.mel = MelExtractor(mel_config(options.audio), device) if options.audio and "audio" in index.get("modalities", []) else None
        self.image = OpenClipImageEncoder(parse_encoder(options.image), device, tokens=options.image_tokens) if options.image else None
        self.text = OpenClipTokenizer(options.text) if options.text else None

    def config(self) -> dict:
        return {"image": self.image.attrs() if self.image else None,
                "text": self.text.attrs() if self.text else None,
                "audio": self.mel.config.attrs() if self.mel else None}

    def dims(self) -> dict:
        dims = {}
        if self.image:
            dims["image_dim"] = self.image.embed_dim
            if self.image.tokens:
                blank = torch.zeros(1, 3, *_pair(self.image.visual.image_size))
                dims["image_tokens"] = list(self.image.encode_pixels(blank)[1].shape[1:])
        if self.text:
            dims["context_length"] = self.text.context_length
        return dims


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def featurize(shards: Path, store_path: Path, options: FeaturizeOptions = FeaturizeOptions(), *,
              reporter: Reporter = SILENT, stop_after: int | None = None) -> FeaturizeSummary:
    """Compute the features of every shard of `shards` (or of `options.splits`) into `store_path`.

    `stop_after` ends the run after that many shards were written (tests use it to interrupt).
    """
    if options.batch_size < 1 or options.workers < 1:
        raise ConfigError("--batch-size and --workers must be at least 1")
    shards, store_path = Path(shards), Path(store_path)
    index = read_index(shards)
    splits = _choose_splits(index, options.splits)
    device = resolve_device(options.device)
    extractors = _Extractors(options, index, device)
    config = {**extractors.config(), "splits": splits}
    fingerprint = index_fingerprint(index, splits)

    try:
        store = _open_or_create(store_path, shards, index, splits, config, fingerprint, extractors, options.overwrite)
    except OSError as error:  # a full disk or an unwritable path: nothing was complete, so nothing is kept
        shutil.rmtree(store_path, ignore_errors=True)
        raise TrimodalError(f"cannot create the feature store {store_path}: {error.strerror or error}") from error
    summary = FeaturizeSummary(store_path, str(device), random_init=bool(extractors.image and extractors.image.random_init),
                               config=config)
    slots = list(store.slots.values())
    entries = {s["name"]: s for split in splits for s in index["splits"][split]["shards"]}
    with reporter.task("featurize", total=sum(s.rows[1] - s.rows[0] for s in slots), unit="samples") as task, \
            ThreadPoolExecutor(options.workers) as pool:
        for slot in slots:
            if slot.done:
                summary.shards_skipped.append(slot.name)
                task.advance(slot.rows[1] - slot.rows[0])
                continue
            features = _featurize_shard(shards / slot.name, entries[slot.name], extractors, options.batch_size,
                                        pool, task.advance)
            try:
                store.write_shard(slot, features)
            except OSError as error:
                # The slot is marked complete only after its arrays, so a rerun redoes just this shard.
                raise TrimodalError(f"cannot write {slot.name}'s features into {store_path}: "
                                    f"{error.strerror or error}; shards already written are kept, run the same "
                                    "command again to continue") from error
            summary.shards_written.append(slot.name)
            if stop_after is not None and len(summary.shards_written) >= stop_after:
                break
    counts = store.group.attrs["counts"]
    summary.rows, summary.captions, summary.utterances = counts["rows"], counts["captions"], counts["utterances"]
    summary.frames = int(store.group.attrs["frames_committed"])
    return summary


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
                    extractors: _Extractors, overwrite: bool) -> FeatureStore:
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
    return FeatureStore.create(path, slots=plan_layout(index, splits), config=config, fingerprint=fingerprint,
                               shards_path=shards, dims=extractors.dims())


def _featurize_shard(path: Path, entry: dict, extractors: _Extractors, batch_size: int, pool: ThreadPoolExecutor,
                     advance) -> ShardFeatures:
    contents = read_shard(path, images=extractors.image is not None, audio=extractors.mel is not None)
    keys, image_blobs, wav_blobs = contents.keys, contents.images, contents.wavs
    expected = (entry["samples"], entry["captions"], entry["utterances"] if extractors.mel else len(wav_blobs))
    found = (len(keys), len(contents.captions), len(wav_blobs))
    if found != expected or len(set(keys)) != len(keys):
        raise ShardError(f"{path} does not match its index.json entry (samples, captions, utterances: "
                         f"found {found}, index says {expected}); run `mm shard` again")

    features = ShardFeatures(keys=keys)
    # Progress counts samples; images and audio each carry a share of every sample.
    stages = [stage for stage in (extractors.image, extractors.mel) if stage]
    share = len(keys) / max(1, len(stages))
    if extractors.image:
        if any(blob is None for blob in image_blobs):
            raise ShardError(f"{path}: a sample has no image member")
        chunks = [image_blobs[start : start + batch_size] for start in range(0, len(image_blobs), batch_size)]
        decode = lambda blob: extractors.image.pixels([blob])[0]  # noqa: E731
        # Decoding the next batch on the pool overlaps with the tower running on this one.
        pending = [pool.submit(decode, blob) for blob in chunks[0]] if chunks else []
        pooled, tokens = [], []
        for number, chunk in enumerate(chunks):
            pixels = torch.stack([future.result() for future in pending])
            pending = [pool.submit(decode, blob) for blob in chunks[number + 1]] if number + 1 < len(chunks) else []
            batch_pooled, batch_tokens = extractors.image.encode_pixels(pixels)
            pooled.append(batch_pooled)
            if batch_tokens is not None:
                tokens.append(batch_tokens)
            advance(share * len(chunk) / len(keys))
        features.image = np.concatenate(pooled) if pooled else np.zeros((0, extractors.image.embed_dim))
        features.image_tokens = np.concatenate(tokens) if tokens else None
    if extractors.text:
        features.tokens = extractors.text(contents.captions)
        features.caption_ids = np.asarray(contents.caption_ids, dtype=np.int32)
        features.caption_offsets = offsets(contents.caption_counts)
    if extractors.mel:
        # Decoded waveforms are float32 (twice their wav bytes), so a shard is decoded a window at a time.
        mels: list[np.ndarray] = []
        for start in range(0, len(wav_blobs), _AUDIO_WINDOW):
            window = wav_blobs[start : start + _AUDIO_WINDOW]
            waveforms = list(pool.map(lambda blob: extractors.mel.resample(*decode_wav(blob)), window))
            mels += [mel.astype(np.float16) for mel in extractors.mel.batched(
                waveforms, batch_size, on_batch=lambda n: advance(share * n / len(wav_blobs)))]
        if not wav_blobs:
            advance(share)
        features.mel = np.concatenate(mels) if mels else np.zeros((0, extractors.mel.config.n_mels), np.float16)
        features.frame_offsets = offsets([len(m) for m in mels])
        features.utterance_offsets = offsets(contents.wav_counts)
        features.utterance_caption_ids = np.asarray(contents.wav_caption_ids, dtype=np.int32)
    if not stages:
        advance(len(keys))
    return features
