"""The training data path: shards + feature store -> batches of padded tensors with masks.

`TrimodalDataset` is a torch `IterableDataset` for your own loops. Which samples each rank and loader
worker reads, and in what order, comes from `sample_order` (a function of index.json, the seed and the
epoch): every rank makes the same number of batches, and the global order does not depend on the number
of ranks. Each stream reads its pieces of shards from the store in one slice per array, and tar members
only for what the store lacks; a shuffle buffer mixes them; each visit of an image picks one of its
(caption, utterance) pairs, drawn per shard and epoch so that the pick does not depend on who reads it.

    from torch.utils.data import DataLoader
    from trimodal import TrimodalDataset

    dataset = TrimodalDataset("shards/flickr8k", "features/flickr8k.zarr", split="train", batch_size=64)
    loader = DataLoader(dataset, batch_size=None, num_workers=2)
    for epoch in range(10):
        dataset.set_epoch(epoch)
        for batch in loader:
            batch["image"], batch["text"], batch["audio"], batch["audio_mask"]

Under torchrun, `batch_size` is the global batch: each rank's batches hold `batch_size / world_size` rows.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from trimodal.distributed import position
from trimodal.errors import ConfigError, TrimodalError
from trimodal.features.store import FeatureStore, ShardFeatures, StaleCacheError
from trimodal.features.towers import caption_extent
from trimodal.pipeline.read.index import read_index
from trimodal.storage import location
from trimodal.pipeline.read.shards import index_fingerprint, offsets, read_shard
from trimodal.training.models.family import MODALITIES
from trimodal.training.sample_order import EpochPlan, Piece, epoch_batches, plan_epoch, rank_streams, stream_order

# What a model reads of each modality from the store (`Family.store_inputs`): image "embedding" (pooled) or
# "tokens" (image/tokens); text "ids" always, plus "embedding" (text/embedding) or "states" (text/states).
DEFAULT_INPUTS = {"image": "embedding", "text": "ids"}
# (modality, input) -> the store array it reads and the featurize options that write it
_STORE_ARRAYS = {("image", "tokens"): ("image/tokens", "--image-tokens"),
                 ("text", "embedding"): ("text/embedding", "--text open_clip:<model>"),
                 ("text", "states"): ("text/states", "--text open_clip:<model>:layer=L --text-tokens")}


@dataclass
class Item:
    key: str
    image: np.ndarray | None = None  # the pooled embedding (D,) or the tokens (T, W), as the model reads
    tokens: np.ndarray | None = None  # caption token ids
    text_features: np.ndarray | None = None  # the caption's tower embedding (D,) or token states (L, W)
    mel: np.ndarray | None = None  # audio frames
    caption_id: int = -1


@dataclass
class Sources:
    """The shards' index and the feature store, opened and checked once per process (`open_sources`) and
    passed along: to the training stream, to validation, to evaluation."""

    shards: Path
    features: Path
    index: dict
    store: FeatureStore
    checked: set[str] = field(default_factory=set)

    def check(self, split: str) -> None:
        """`split` is in the shards and complete in the store (once per split)."""
        if split in self.checked:
            return
        if split not in self.index["splits"]:
            raise ConfigError(f"split {split!r} is not in {self.shards} (it has {', '.join(self.index['splits'])})")
        if split not in self.store.splits():
            raise ConfigError(f"{self.features} has no features for split {split!r} "
                              f"(it has {', '.join(self.store.splits())})")
        if not self.store.complete(split):
            raise TrimodalError(f"{self.features} is incomplete for split {split!r}; run `mm featurize` again to "
                                "finish it")
        self.checked.add(split)

    def shard_entries(self, split: str) -> list[dict]:
        return self.index["splits"][split]["shards"]

    @property
    def text_spec(self) -> str:
        return (self.store.config.get("text") or {}).get("tokenizer", "open_clip:ViT-B-32")


def open_sources(shards: Path, features: Path, splits: Sequence[str] = ()) -> Sources:
    """The shards' index and the store, checked to belong together and to hold each of `splits` completely."""
    shards, features = location(shards), location(features)
    index = read_index(shards)
    store = FeatureStore.open(features)
    if store.fingerprint != index_fingerprint(index, store.config["splits"]):
        raise StaleCacheError(f"{features} was computed from other shards than {shards} (stale cache); "
                              "run `mm featurize` again with --overwrite")
    sources = Sources(shards, features, index, store)
    for split in splits:
        sources.check(split)
    return sources


def check_inputs(store: FeatureStore, inputs: dict, where: Path) -> dict:
    """`DEFAULT_INPUTS` updated by `inputs`, each one checked to be in the store."""
    inputs = {**DEFAULT_INPUTS, **(inputs or {})}
    for modality, kind in inputs.items():
        array, options = _STORE_ARRAYS.get((modality, kind), (None, None))
        if array and array not in store.group:
            raise ConfigError(f"the model reads {modality} {kind}, but {where} has no {array}; run `mm featurize` "
                              f"with {options} (see the config's `# featurize:` line)")
    return inputs


_SHARED_MEMORY_HINT = ("enlarge /dev/shm (e.g. `docker run --shm-size=2g`), free space there, or set "
                       "train.num_workers=0 to load in the main process")


def check_shared_memory(batch_bytes: int) -> None:
    """Loader workers hand batches over in shared memory (/dev/shm). When a batch does not fit, torch logs
    the failure in the worker and carries on without it, so an epoch would end with no data; probe one
    batch's worth here first, so the run stops with an error that says what to change."""
    try:
        torch.empty(max(1, batch_bytes // 4), dtype=torch.float32).share_memory_()
    except RuntimeError as error:
        raise TrimodalError(f"the data loader's workers cannot use shared memory for a batch of "
                            f"{batch_bytes / 1e6:.1f} MB ({error}); {_SHARED_MEMORY_HINT}") from error


def loader_failure(error: Exception) -> TrimodalError:
    """A dead loader worker (killed by SIGBUS when /dev/shm is full, or raising) as one clear error."""
    return TrimodalError(f"a data loader worker failed: {str(error).splitlines()[0]}; if it ran out of shared "
                         f"memory, {_SHARED_MEMORY_HINT}")


def crop_frames(mel: np.ndarray, max_frames: int, fraction: float | None) -> np.ndarray:
    """At most `max_frames` frames: the window starting `fraction` of the way into the possible starts
    (a uniform draw in training), or the central one when `fraction` is None."""
    if len(mel) <= max_frames:
        return mel
    starts = len(mel) - max_frames + 1
    start = min(int(fraction * starts), starts - 1) if fraction is not None else (len(mel) - max_frames) // 2
    return mel[start : start + max_frames]


def collate(items: Sequence[Item], modalities: Sequence[str]) -> dict:
    """Pad a list of items into tensors; `<modality>_present` says which rows carry each modality."""
    batch: dict = {"keys": [item.key for item in items],
                   "caption_id": torch.tensor([item.caption_id for item in items], dtype=torch.long)}
    if "image" in modalities:
        images = _stack([i.image for i in items])
        # Pooled embeddings are "image"; patch tokens or a tower's states after a block, "image_tokens".
        batch["image" if images.ndim == 2 else "image_tokens"] = images
        batch["image_present"] = torch.tensor([i.image is not None for i in items])
    if "text" in modalities:
        length = next((len(i.tokens) for i in items if i.tokens is not None), 77)
        batch["text"] = torch.from_numpy(np.stack([
            i.tokens.astype(np.int64) if i.tokens is not None else np.zeros(length, np.int64) for i in items]))
        batch["text_present"] = torch.tensor([i.tokens is not None for i in items])
        if any(i.text_features is not None for i in items):
            features = _stack([i.text_features for i in items])
            if features.ndim == 3:  # token states: nothing past the batch's last end-of-text token is read
                features = features[:, : caption_extent(batch["text"])]
            batch["text_embedding" if features.ndim == 2 else "text_states"] = features
    if "audio" in modalities:
        n_mels = next((i.mel.shape[1] for i in items if i.mel is not None), 80)  # the frame width
        frames = max([len(i.mel) for i in items if i.mel is not None] or [1])
        audio = np.zeros((len(items), frames, n_mels), np.float32)
        mask = np.zeros((len(items), frames), bool)
        for row, item in enumerate(items):
            if item.mel is not None:
                audio[row, : len(item.mel)] = item.mel
                mask[row, : len(item.mel)] = True
        batch["audio"], batch["audio_mask"] = torch.from_numpy(audio), torch.from_numpy(mask)
        batch["audio_present"] = torch.tensor([i.mel is not None for i in items])
    return batch


def _stack(arrays: list[np.ndarray | None]) -> torch.Tensor:
    """float32 rows stacked; a missing row (None) is zeros of the others' shape."""
    reference = next((a for a in arrays if a is not None), None)
    shape = reference.shape if reference is not None else (1,)
    return torch.from_numpy(np.stack([a.astype(np.float32) if a is not None else np.zeros(shape, np.float32)
                                      for a in arrays]))


class TrimodalDataset(IterableDataset):
    """Batches (dicts of padded tensors and masks) from shards + feature store; see the module doc.

    `shards` is a shard folder (with `features` the store), or `Sources` already opened. `batch_size` is
    the global batch; `streams` how many sample streams make one (default: the world size); any world size
    that divides `streams` reads the same global batches. Loader workers split the batches between them.
    `accumulation` rounds the epoch's batches down to a multiple of it (with `drop_last`).

    `inputs` says what the model reads (`DEFAULT_INPUTS`): {"image": "tokens"} adds `batch["image_tokens"]`
    in place of `batch["image"]`; {"text": "embedding" | "states"} adds `batch["text_embedding"]` or
    `batch["text_states"]` next to the ids."""

    def __init__(self, shards: str | Path | Sources, features: str | Path | None = None, split: str = "train", *,
                 modalities: Sequence[str] = MODALITIES, batch_size: int = 64, shuffle: bool = True, seed: int = 0,
                 epoch: int = 0, shuffle_buffer: int = 1000, max_audio_frames: int = 1000, drop_last: bool = False,
                 rank: int | None = None, world_size: int | None = None, streams: int | None = None,
                 accumulation: int = 1, inputs: dict | None = None):
        unknown = set(modalities) - set(MODALITIES)
        if unknown or not modalities:
            raise ConfigError(f"modalities must be a non-empty subset of {MODALITIES} (got {list(modalities)})")
        self.sources = shards if isinstance(shards, Sources) else open_sources(shards, features, [split])
        self.sources.check(split)
        self.split = split
        self.modalities = tuple(m for m in MODALITIES if m in modalities)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        # Shared with loader workers, so that persistent workers see set_epoch() of the main process.
        self._epoch = multiprocessing.Value("q", epoch, lock=False)
        self._start = multiprocessing.Value("q", 0, lock=False)
        self.shuffle_buffer, self.max_audio_frames, self.drop_last = shuffle_buffer, max_audio_frames, drop_last
        # Resolved here, in the main process: a spawned loader worker has no process group to ask.
        group_rank, group_world = position()
        self.rank = rank if rank is not None else group_rank
        self.world_size = world_size if world_size is not None else group_world
        self.accumulation = accumulation
        entries = self.sources.shard_entries(split)
        self.shard_names = [entry["name"] for entry in entries]
        self.shard_samples = [entry["samples"] for entry in entries]
        self.samples = sum(self.shard_samples)
        self.streams = streams or self.world_size
        if batch_size % self.world_size:
            raise ConfigError(f"the batch of {batch_size} rows cannot be split evenly over {self.world_size} ranks "
                              "(train.batch_size is the global batch: make it a multiple of the number of ranks)")
        if self.world_size > 1 and not drop_last:
            raise ConfigError("with several ranks every batch must be whole (drop_last=True): a short last batch "
                              "cannot be shared evenly")
        rank_streams(self.streams, 0, self.world_size)
        self.plan(1)  # the layout's own checks, before any worker starts
        store = self.sources.store
        self.from_store = {m: store.has(m) for m in self.modalities}
        if "image" in self.modalities and not self.from_store["image"]:
            raise ConfigError(f"{self.sources.features} has no image embeddings; run `mm featurize` with --image")
        self.inputs = check_inputs(store, inputs, self.sources.features)
        self._store_pid = os.getpid()

    @property
    def epoch(self) -> int:
        return self._epoch.value

    @property
    def start_batch(self) -> int:
        return self._start.value

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Call before iterating an epoch; loader workers, persistent ones included, follow. `start_batch`
        continues the epoch at that global batch (a mid-epoch resume): the batches before it are skipped
        without reading their samples, and the rest come exactly as in an uninterrupted epoch."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ConfigError(f"batch {start_batch} is outside the epoch's {self.batches_per_epoch} batches")
        self._epoch.value = epoch
        self._start.value = start_batch

    def plan(self, groups: int, epoch: int | None = None) -> EpochPlan:
        """The epoch's layout for `groups` loader workers (see `sample_order`)."""
        return plan_epoch(self.shard_samples, batch_size=self.batch_size, streams=self.streams, groups=groups,
                          seed=self.seed, epoch=self.epoch if epoch is None else epoch, shuffle=self.shuffle,
                          drop_last=self.drop_last, multiple=self.accumulation if self.drop_last else 1)

    @property
    def batches_per_epoch(self) -> int:
        """Global batches in every epoch (the same on every rank, for any number of workers, every epoch)."""
        return epoch_batches(self.samples, self.batch_size, drop_last=self.drop_last,
                             multiple=self.accumulation if self.drop_last else 1)

    def _position(self) -> tuple[int, int, int, int]:
        info = get_worker_info()
        return self.rank, self.world_size, (info.id if info else 0), (info.num_workers if info else 1)

    def _store(self) -> FeatureStore:
        """The store, opened once per process: a loader worker (forked or spawned) opens its own, without the
        checks again."""
        if self._store_pid != os.getpid():
            self.sources.store = FeatureStore.open(self.sources.features)
            self._store_pid = os.getpid()
        return self.sources.store

    def __iter__(self) -> Iterator[dict]:
        rank, world, worker, workers = self._position()
        epoch, start = self.epoch, self.start_batch
        plan = self.plan(workers, epoch)
        mine = rank_streams(self.streams, rank, world)
        # A DataLoader asks its workers in turn from worker 0, so the worker that makes batch `start` is
        # worker 0: group g is made by worker (g - start) mod G.
        group = (worker + start) % workers
        skipped = [b for b in plan.group_batches(group) if b < start]
        readers = {q: self._stream_items(plan.pieces[(group, q)], epoch, group * self.streams + q,
                                         skip=sum(plan.rows(b, q) for b in skipped)) for q in mine}
        for batch in plan.group_batches(group)[len(skipped):]:
            items = []
            for q in mine:
                items.extend(itertools.islice(readers[q], plan.rows(batch, q)))
            yield collate(items, self.modalities)

    def _stream_items(self, pieces: list[Piece], epoch: int, stream: int, skip: int = 0) -> Iterator[Item]:
        """One stream's samples in its order, from its `skip`-th on; each piece's features are read when
        first needed and dropped after their last sample (the order is indices: skipping reads nothing)."""
        rng = np.random.default_rng([self.seed, epoch, stream]) if self.shuffle else None
        order = stream_order(pieces, buffer=self.shuffle_buffer, rng=rng)
        last_use = {number: position for position, (number, _) in enumerate(order)}
        loaded: dict[int, tuple[ShardFeatures, np.ndarray]] = {}
        fallback = _TarFallback(self.sources.text_spec) if not all(self.from_store.values()) else None
        for position, (number, row) in itertools.islice(enumerate(order), skip, None):
            if number not in loaded:
                loaded[number] = self._load(pieces[number], epoch, fallback)
            features, draws = loaded[number]
            yield self._item(features, row - pieces[number].start, draws[:, row - pieces[number].start])
            if last_use[number] == position:
                del loaded[number]

    def _load(self, piece: Piece, epoch: int, fallback) -> tuple[ShardFeatures, np.ndarray]:
        name = self.shard_names[piece.shard]
        features = read_features(self._store(), name, self.modalities, self.inputs, rows=(piece.start, piece.stop),
                                 text=self.from_store.get("text", False), audio=self.from_store.get("audio", False))
        if fallback is not None:
            fallback.fill(self.sources.shards / name, features, rows=(piece.start, piece.stop),
                          text="text" in self.modalities and not self.from_store["text"],
                          audio="audio" in self.modalities and not self.from_store["audio"])
        # Uniform draws for the caption, the utterance and the crop of every row of the shard: a function of
        # (seed, epoch, shard), so whichever stream reads a row picks the same pair.
        draws = np.random.default_rng([self.seed, epoch, piece.shard, 1]).random((3, self.shard_samples[piece.shard]))
        return features, draws[:, piece.start : piece.stop]

    def _item(self, features: ShardFeatures, row: int, draws: np.ndarray) -> Item:
        caption_draw, utterance_draw, crop_draw = draws
        item = Item(features.keys[row])
        images = features.image_tokens if features.image_tokens is not None else features.image
        if images is not None:
            item.image = images[row]
        caption_id = None
        if features.tokens is not None and "text" in self.modalities:
            c0, c1 = features.caption_offsets[row], features.caption_offsets[row + 1]
            if c1 > c0:
                pick = c0 + min(int(caption_draw * (c1 - c0)), c1 - c0 - 1)
                item.tokens, caption_id = features.tokens[pick], int(features.caption_ids[pick])
                text_features = _text_features(features)
                if text_features is not None:
                    item.text_features = text_features[pick]
        if features.mel is not None and "audio" in self.modalities:
            u0, u1 = features.utterance_offsets[row], features.utterance_offsets[row + 1]
            spoken = list(range(u0, u1))
            if caption_id is not None:  # the utterance that speaks the chosen caption
                spoken = [u for u in spoken if features.utterance_caption_ids[u] == caption_id]
            if spoken:
                pick = spoken[min(int(utterance_draw * len(spoken)), len(spoken) - 1)]
                mel = features.mel[features.frame_offsets[pick] : features.frame_offsets[pick + 1]]
                item.mel = crop_frames(mel, self.max_audio_frames, crop_draw if self.shuffle else None)
                caption_id = int(features.utterance_caption_ids[pick]) if caption_id is None else caption_id
        item.caption_id = -1 if caption_id is None else caption_id
        return item


def read_features(store: FeatureStore, name: str, modalities: Sequence[str], inputs: dict, *, text: bool,
                  audio: bool, rows: tuple[int, int] | None = None) -> ShardFeatures:
    """One shard's features (or those of its `rows`): of images and captions what `inputs` asks for."""
    return store.read_shard(name, rows=rows, image="image" in modalities and inputs["image"] == "embedding",
                            image_tokens="image" in modalities and inputs["image"] == "tokens", text=text,
                            text_embedding=text and inputs["text"] == "embedding",
                            text_states=text and inputs["text"] == "states", audio=audio)


def _text_features(features: ShardFeatures) -> np.ndarray | None:
    return features.text_states if features.text_states is not None else features.text_embedding


class _TarFallback:
    """Computes from the tar what the store lacks: caption tokens, log-mels."""

    def __init__(self, text_spec: str):
        self._text_spec, self._tokenizer, self._mel = text_spec, None, None

    def fill(self, tar: Path, features: ShardFeatures, *, text: bool, audio: bool,
             rows: tuple[int, int] | None = None) -> None:
        if not (text or audio):
            return
        contents = read_shard(tar, images=False, audio=audio)
        if rows is not None:
            contents = contents.rows(*rows)
        if text:
            if self._tokenizer is None:
                from trimodal.features.text import OpenClipTokenizer

                self._tokenizer = OpenClipTokenizer(self._text_spec)
            features.tokens = self._tokenizer(contents.captions)
            features.caption_ids = np.asarray(contents.caption_ids, np.int32)
            features.caption_offsets = offsets(contents.caption_counts)
        if audio:
            if self._mel is None:
                from trimodal.features.audio import MelExtractor

                self._mel = MelExtractor()
            mels = self._mel.from_bytes(contents.wavs)
            features.mel = np.concatenate(mels) if mels else np.zeros((0, 80), np.float32)
            features.frame_offsets = offsets([len(m) for m in mels])
            features.utterance_offsets = offsets(contents.wav_counts)
            features.utterance_caption_ids = np.asarray(contents.wav_caption_ids, np.int32)


@dataclass
class SplitData:
    """Every image, caption and utterance of a split, for evaluation."""

    keys: list[str]
    images: np.ndarray | None  # (N, D) pooled, or (N, T, W) tokens (float16), as the model reads them
    tokens: np.ndarray | None  # (C, L)
    caption_image: np.ndarray | None  # (C,) row of each caption's image
    mels: list[np.ndarray] | None  # U arrays (frames, width)
    utterance_image: np.ndarray | None  # (U,)
    text_features: np.ndarray | None = None  # (C, D) tower embeddings or (C, L', W) token states (float16)

    def item(self, modality: str, row: int) -> Item:
        """Image, caption or utterance `row` as an Item for `collate`."""
        if modality == "image":
            return Item("", image=self.images[row])
        if modality == "text":
            return Item("", tokens=self.tokens[row],
                        text_features=None if self.text_features is None else self.text_features[row])
        return Item("", mel=self.mels[row])


def load_split(sources: Sources, split: str, modalities: Sequence[str] = MODALITIES, max_audio_frames: int = 1000,
               inputs: dict | None = None) -> SplitData:
    """Every image, caption and utterance of `split` (checked complete in `sources`), in shard order."""
    sources.check(split)
    store = sources.store
    inputs = check_inputs(store, inputs, sources.features)
    keys, images, tokens, caption_image, mels, utterance_image, text_features = [], [], [], [], [], [], []
    fallback = _TarFallback(sources.text_spec)
    for entry in sources.shard_entries(split):
        name = entry["name"]
        part = read_features(store, name, modalities, inputs, text=store.has("text"), audio=store.has("audio"))
        fallback.fill(sources.shards / name, part, text="text" in modalities and not store.has("text"),
                      audio="audio" in modalities and not store.has("audio")
                      and "audio" in sources.index.get("modalities", []))
        base = len(keys)
        keys += part.keys
        if part.image is not None:
            images.append(part.image.astype(np.float32))
        if part.image_tokens is not None:
            images.append(part.image_tokens)
        if part.tokens is not None and "text" in modalities:
            tokens.append(part.tokens)
            if _text_features(part) is not None:
                text_features.append(_text_features(part))
            caption_image.append(base + np.repeat(np.arange(len(part.keys)), np.diff(part.caption_offsets)))
        if part.mel is not None and "audio" in modalities:
            for u in range(len(part.frame_offsets) - 1):
                mels.append(crop_frames(part.mel[part.frame_offsets[u] : part.frame_offsets[u + 1]], max_audio_frames,
                                        None))
            utterance_image.append(base + np.repeat(np.arange(len(part.keys)), np.diff(part.utterance_offsets)))
    return SplitData(
        keys=keys,
        images=np.concatenate(images) if images else None,
        tokens=np.concatenate(tokens) if tokens else None,
        caption_image=np.concatenate(caption_image) if caption_image else None,
        mels=mels if mels else None,
        utterance_image=np.concatenate(utterance_image) if utterance_image else None,
        text_features=_trimmed(np.concatenate(text_features), np.concatenate(tokens)) if text_features else None,
    )


def _trimmed(text_features: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Token states cut after the split's last end-of-text position (nothing later is read)."""
    if text_features.ndim != 3 or not len(tokens):
        return text_features
    return text_features[:, : caption_extent(torch.from_numpy(tokens))]
