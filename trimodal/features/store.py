"""The feature store: one zarr v3 group per shard set, one contiguous row range per shard.

Layout (N images, C captions, U utterances, F mel frames, all in shard order):

    keys                    (N, 64) uint8      the sample key per row, NUL-padded ASCII
    image/embedding         (N, D)  float16    pooled image-tower output
    image/tokens            (N, T, W) float16  patch tokens (with --image-tokens)
    text/tokens             (C, 77) int32      tokenizer ids, 0-padded
    text/caption_offsets    (N+1,)  int64      captions of row i are [offsets[i], offsets[i+1])
    text/caption_ids        (C,)    int32      the dataset's caption number
    text/embedding          (C, D)  float16    a text tower's pooled output (with --text open_clip:…)
    text/states             (C, 77, W) float16 its token states after a block (with --text-tokens)
    audio/mel               (F, 80) float16    log-mel frames, utterances back to back
      or audio/frames       (F, W)  float16    a speech tower's states after a layer (--audio torchaudio:…)
    audio/frame_offsets     (U+1,)  int64
    audio/utterance_offsets (N+1,)  int64
    audio/caption_ids       (U,)    int32      which caption each utterance speaks

The group's attributes hold the extractor configs, the fingerprint of the shards' `index.json`, and per
shard its row, caption, utterance and frame ranges and whether it is complete. Shards are written in
order by one process; the mel array grows shard by shard (metadata-only resizes).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import zarr

from trimodal import __version__
from trimodal.errors import StorageError, TrimodalError
from trimodal.pipeline.base.samples import KEY_BYTES, key_problem
from trimodal.storage import absolute, location, remove_tree, storage_errors

FORMAT = "trimodal-features/1"
KEY_WIDTH = KEY_BYTES


class StaleCacheError(TrimodalError):
    """A store was written with other settings or from other shards."""


@dataclass
class ShardSlot:
    name: str
    split: str
    rows: tuple[int, int]
    captions: tuple[int, int]
    utterances: tuple[int, int]
    frames: tuple[int, int] | None = None
    done: bool = False

    @classmethod
    def from_dict(cls, value: dict) -> "ShardSlot":
        return cls(value["name"], value["split"], tuple(value["rows"]), tuple(value["captions"]),
                   tuple(value["utterances"]), tuple(value["frames"]) if value.get("frames") else None,
                   bool(value.get("done")))


@dataclass
class ShardFeatures:
    """One shard's features, offsets relative to the shard."""

    keys: list[str]
    image: np.ndarray | None = None
    image_tokens: np.ndarray | None = None
    caption_offsets: np.ndarray | None = None
    tokens: np.ndarray | None = None
    caption_ids: np.ndarray | None = None
    text_embedding: np.ndarray | None = None
    text_states: np.ndarray | None = None
    utterance_offsets: np.ndarray | None = None
    frame_offsets: np.ndarray | None = None
    mel: np.ndarray | None = None  # audio frames: log-mels, or a speech tower's states (see `audio_layout`)
    utterance_caption_ids: np.ndarray | None = None


def audio_layout(attrs: dict) -> tuple[str, int, int]:
    """(store array, frame width, frames per second) of the audio features an extractor's attrs describe."""
    if "n_mels" in attrs:
        return "audio/mel", int(attrs["n_mels"]), int(attrs["sample_rate"]) // int(attrs["hop_length"])
    return "audio/frames", int(attrs["frame_dim"]), int(attrs["frame_rate"])


def plan_layout(index: dict, splits: list[str]) -> list[ShardSlot]:
    """Row, caption and utterance ranges of every shard of `splits`, in split then shard order."""
    slots, row, caption, utterance = [], 0, 0, 0
    for split in splits:
        for shard in index["splits"][split]["shards"]:
            slots.append(ShardSlot(shard["name"], split, (row, row + shard["samples"]),
                                   (caption, caption + shard["captions"]),
                                   (utterance, utterance + shard["utterances"])))
            row, caption, utterance = row + shard["samples"], caption + shard["captions"], utterance + shard["utterances"]
    return slots


def encode_keys(keys: list[str]) -> np.ndarray:
    encoded = np.zeros((len(keys), KEY_WIDTH), dtype=np.uint8)
    for row, key in enumerate(keys):
        why = key_problem(key)
        if why:
            raise TrimodalError(f"sample key {key!r} {why}; the feature store cannot hold it")
        raw = key.encode("ascii")
        encoded[row, : len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    return encoded


def decode_keys(encoded: np.ndarray) -> list[str]:
    return [bytes(row).rstrip(b"\0").decode("ascii") for row in encoded]


def config_differences(stored: dict, wanted: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two nested config dicts."""
    differences = []
    for key in sorted(set(stored) | set(wanted)):
        a, b = stored.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            differences += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            differences.append(f"{prefix}{key}: store has {json.dumps(a)}, asked for {json.dumps(b)}")
    return differences


class FeatureStore:
    def __init__(self, path: Path, group: zarr.Group):
        self.path, self.group = location(path), group

    def __getstate__(self) -> dict:
        return {"path": self.path, "mode": self.group.store.read_only}

    def __setstate__(self, state: dict) -> None:
        # A store crosses a process boundary as its path and is opened again on the other side.
        reopened = FeatureStore.open(state["path"], mode="r" if state["mode"] else "a")
        self.path, self.group = reopened.path, reopened.group

    # -- opening and creating ---------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, mode: str = "r") -> "FeatureStore":
        path = location(path)
        with storage_errors(f"opening the feature store {path}"):
            found = (path / "zarr.json").is_file()
        if not found:
            raise TrimodalError(f"{path} is not a feature store (run `mm featurize SHARDS --out {path}`)")
        try:  # a URL goes to zarr's fsspec store, with fsspec's credentials
            group = zarr.open_group(str(path), mode=mode)
        except (OSError, StorageError) as error:
            raise StorageError(f"cannot open feature store {path}: {error}") from error
        except Exception as error:  # zarr raises assorted types for damaged metadata
            raise TrimodalError(f"cannot open feature store {path}: {error}") from error
        if group.attrs.get("format") != FORMAT:
            raise TrimodalError(f"{path} is not a trimodal feature store (format {group.attrs.get('format')!r})")
        return cls(path, group)

    @classmethod
    def create(cls, path: Path, *, slots: list[ShardSlot], config: dict, fingerprint: str, shards_path: Path,
               dims: dict) -> "FeatureStore":
        """A new, empty store with every array pre-sized except the mel frames (which grow)."""
        path = location(path)
        remove_tree(path)
        group = zarr.open_group(str(path), mode="w")
        rows = slots[-1].rows[1] if slots else 0
        captions = slots[-1].captions[1] if slots else 0
        utterances = slots[-1].utterances[1] if slots else 0

        def array(name, shape, dtype, chunk_rows, growing=False):
            rows_per_chunk = chunk_rows if growing else max(1, min(shape[0], chunk_rows))
            chunks = (rows_per_chunk,) + tuple(max(1, s) for s in shape[1:])
            group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, fill_value=0)

        array("keys", (rows, KEY_WIDTH), "uint8", 8192)
        if config.get("image"):
            array("image/embedding", (rows, dims["image_dim"]), "float16", 4096)
            if config["image"].get("tokens"):
                array("image/tokens", (rows, *dims["image_tokens"]), "float16", 64)
        if config.get("text"):
            array("text/tokens", (captions, dims["context_length"]), "int32", 16384)
            array("text/caption_offsets", (rows + 1,), "int64", 65536)
            array("text/caption_ids", (captions,), "int32", 65536)
            tower = config["text"].get("tower")
            if tower:
                array("text/embedding", (captions, dims["text_dim"]), "float16", 4096)
                if tower.get("tokens"):
                    array("text/states", (captions, *dims["text_states"]), "float16", 64)
        if config.get("audio"):
            name, width, _ = audio_layout(config["audio"])
            array(name, (0, width), "float16", 32768, growing=True)
            array("audio/frame_offsets", (utterances + 1,), "int64", 65536)
            array("audio/utterance_offsets", (rows + 1,), "int64", 65536)
            array("audio/caption_ids", (utterances,), "int32", 65536)
        group.attrs.update({
            "format": FORMAT, "created_with": f"trimodal {__version__}", "config": config,
            "shards_fingerprint": fingerprint, "shards_path": str(absolute(shards_path)),
            "counts": {"rows": rows, "captions": captions, "utterances": utterances},
            "frames_committed": 0, "slots": [_slot_dict(slot) for slot in slots],
        })
        return cls(path, group)

    # -- what the store holds ---------------------------------------------------------------------

    @property
    def config(self) -> dict:
        return self.group.attrs["config"]

    @property
    def fingerprint(self) -> str:
        return self.group.attrs["shards_fingerprint"]

    @property
    def slots(self) -> dict[str, ShardSlot]:
        return {s["name"]: ShardSlot.from_dict(s) for s in self.group.attrs["slots"]}

    def has(self, modality: str) -> bool:
        return bool(self.config.get(modality))

    @property
    def audio_array(self) -> str | None:
        return audio_layout(self.config["audio"])[0] if self.has("audio") else None

    def splits(self) -> list[str]:
        return list(dict.fromkeys(slot.split for slot in self.slots.values()))

    def complete(self, split: str | None = None) -> bool:
        return all(s.done for s in self.slots.values() if split is None or s.split == split)

    def _commit(self, slot: ShardSlot, frames_committed: int) -> None:
        slots = [_slot_dict(slot) if s["name"] == slot.name else s for s in self.group.attrs["slots"]]
        self.group.attrs.update({"slots": slots, "frames_committed": frames_committed})

    # -- writing ----------------------------------------------------------------------------------

    def write_shard(self, slot: ShardSlot, features: ShardFeatures) -> ShardSlot:
        """Write one shard's rows (all arrays, one region each), then mark it complete."""
        r0, r1 = slot.rows
        c0, c1 = slot.captions
        u0, u1 = slot.utterances
        group = self.group
        group["keys"][r0:r1] = encode_keys(features.keys)
        if "image/embedding" in group:
            group["image/embedding"][r0:r1] = features.image.astype(np.float16)
        if "image/tokens" in group:
            group["image/tokens"][r0:r1] = features.image_tokens.astype(np.float16)
        if "text/tokens" in group:
            group["text/tokens"][c0:c1] = features.tokens
            group["text/caption_ids"][c0:c1] = features.caption_ids
            group["text/caption_offsets"][r0 + 1 : r1 + 1] = c0 + features.caption_offsets[1:]
        if "text/embedding" in group:
            group["text/embedding"][c0:c1] = features.text_embedding.astype(np.float16)
        if "text/states" in group:
            group["text/states"][c0:c1] = features.text_states.astype(np.float16)
        frames = None
        if self.audio_array:
            mel = group[self.audio_array]
            f0 = int(group.attrs["frames_committed"])
            f1 = f0 + len(features.mel)
            mel.resize((f1, mel.shape[1]))  # also drops frames an interrupted run left beyond f0
            if f1 > f0:
                mel[f0:f1] = features.mel.astype(np.float16)
            group["audio/frame_offsets"][u0 + 1 : u1 + 1] = f0 + features.frame_offsets[1:]
            group["audio/utterance_offsets"][r0 + 1 : r1 + 1] = u0 + features.utterance_offsets[1:]
            group["audio/caption_ids"][u0:u1] = features.utterance_caption_ids
            frames = (f0, f1)
        done = ShardSlot(slot.name, slot.split, slot.rows, slot.captions, slot.utterances, frames, True)
        self._commit(done, frames[1] if frames else 0)
        return done

    # -- reading ----------------------------------------------------------------------------------

    def read_shard(self, name: str, *, image: bool = True, image_tokens: bool = False, text: bool = True,
                   text_embedding: bool = False, text_states: bool = False, audio: bool = True,
                   rows: tuple[int, int] | None = None) -> ShardFeatures:
        """One shard's features (or those of its `rows` [start, stop)), one slice per array."""
        slot = self.slots.get(name)
        if slot is None:
            raise TrimodalError(f"{self.path} has no features for shard {name}")
        if not slot.done:
            raise TrimodalError(f"features of shard {name} in {self.path} are incomplete; run `mm featurize` again")
        group = self.group
        r0, r1 = slot.rows
        if rows is not None:
            r0, r1 = r0 + rows[0], r0 + rows[1]
        out = ShardFeatures(keys=decode_keys(group["keys"][r0:r1]))
        if image and "image/embedding" in group:
            out.image = group["image/embedding"][r0:r1]
        if image_tokens and "image/tokens" in group:
            out.image_tokens = group["image/tokens"][r0:r1]
        if text and "text/tokens" in group:
            offsets = group["text/caption_offsets"][r0 : r1 + 1]
            c0, c1 = int(offsets[0]), int(offsets[-1])
            out.caption_offsets = offsets - c0
            out.tokens = group["text/tokens"][c0:c1]
            out.caption_ids = group["text/caption_ids"][c0:c1]
            if text_embedding and "text/embedding" in group:
                out.text_embedding = group["text/embedding"][c0:c1]
            if text_states and "text/states" in group:
                out.text_states = group["text/states"][c0:c1]
        if audio and self.audio_array:
            offsets = group["audio/utterance_offsets"][r0 : r1 + 1]
            u0, u1 = int(offsets[0]), int(offsets[-1])
            out.utterance_offsets = offsets - u0
            frame_offsets = group["audio/frame_offsets"][u0 : u1 + 1]
            f0, f1 = int(frame_offsets[0]), int(frame_offsets[-1])
            out.frame_offsets = frame_offsets - f0
            out.mel = group[self.audio_array][f0:f1]
            out.utterance_caption_ids = group["audio/caption_ids"][u0:u1]
        return out


def _slot_dict(slot: ShardSlot) -> dict:
    value = asdict(slot)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in value.items()}
