"""`mm search`: a raw query of any modality against an index `mm index` wrote.

The query is featurized as the store was (`trimodal.features.query`), encoded by the run's encoder of its
modality (`Family.encode`, as every indexed row was) and looked up in the index of the modality searched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from trimodal.errors import ConfigError, TrimodalError
from trimodal.search.index import FORMAT, ITEMS, MANIFEST, MODALITIES, index_file, read_index_bytes
from trimodal.storage import StoragePath, location, storage_errors

MAX_K = 1000
DEFAULT_IN = {"text": "image", "image": "text", "audio": "image"}  # what a query of each kind looks for


@dataclass
class Result:
    rank: int
    score: float
    key: str  # the image's key (a caption or utterance result: the image it belongs to)
    caption: str  # the caption found (an image result: its first caption)
    shard: str
    modality: str  # what was searched
    captions: list[str]  # every caption of the image
    utterances: list[dict]  # {member, caption}: its spoken captions in the shard

    def to_dict(self) -> dict:
        return {"rank": self.rank, "score": round(self.score, 6), "key": self.key, "caption": self.caption,
                "shard": self.shard, "in": self.modality, "captions": self.captions,
                "utterances": self.utterances}


class SearchIndex:
    """An index folder: its manifest, its items, and (loaded when first searched) each modality's index."""

    def __init__(self, path: str | StoragePath):
        self.path = location(path)
        with storage_errors(f"reading the index {self.path}"):
            manifest_path = self.path / MANIFEST
            if not manifest_path.is_file():
                raise TrimodalError(f"{self.path} is not a finished search index (no {MANIFEST}); run `mm index`")
            self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            if self.manifest.get("format") != FORMAT:
                raise TrimodalError(f"{manifest_path} is format {self.manifest.get('format')!r}, not {FORMAT}")
            self.items = json.loads((self.path / ITEMS).read_text(encoding="utf-8"))
        self._indexes: dict = {}
        self._rows = {image["key"]: row for row, image in enumerate(self.items["images"])}
        self.shards = location(self.manifest["shards"])

    @property
    def modalities(self) -> list[str]:
        return [m for m in MODALITIES if m in self.manifest["modalities"]]

    def check_modality(self, modality: str) -> None:
        """A ConfigError unless this index has `modality`."""
        if modality not in MODALITIES:
            raise ConfigError(f"--in must be image, text or audio (got {modality!r})")
        if modality not in self.manifest["modalities"]:
            raise ConfigError(f"--in {modality}: {self.path} indexes {', '.join(self.modalities)}")

    def index(self, modality: str):
        if modality not in self._indexes:
            self.check_modality(modality)
            # faiss keeps its threads: it shares torch's OpenMP runtime, so setting its thread count would
            # set the model's too (docs/benchmarks.md).
            with storage_errors(f"reading {index_file(self.path, modality)}"):
                self._indexes[modality] = read_index_bytes(index_file(self.path, modality).read_bytes())
        return self._indexes[modality]

    def media(self, key: str, kind: str, number: int = 0) -> tuple[bytes, str]:
        """(bytes, member name) of the image of `key` (`kind` "image") or its spoken caption `number`
        ("audio"), read from the shards; a key the index does not hold is a KeyError (nothing else is read)."""
        from trimodal.pipeline.read.shards import Extent, read_member

        image = self.items["images"][self._rows[key]]
        if kind == "audio" and not 0 <= number < len(image["utterances"]):
            raise KeyError(f"{key}/{number}")
        member = image["image"] if kind == "image" else image["utterances"][number]
        if member is None:
            raise KeyError(key)
        return read_member(self.shards / image["shard"], Extent(member["offset"], member["size"])), member["member"]

    def search(self, vector: np.ndarray, modality: str, k: int = 10) -> list[Result]:
        """The `k` nearest rows of `modality` to the unit-length `vector` (D,), best first."""
        check_k(k)
        index = self.index(modality)
        scores, rows = index.search(np.asarray(vector, dtype=np.float32).reshape(1, -1), min(k, index.ntotal))
        return [self._result(rank, float(score), int(row), modality)
                for rank, (score, row) in enumerate(zip(scores[0], rows[0]), start=1) if row >= 0]

    def _result(self, rank: int, score: float, row: int, modality: str) -> Result:
        if modality == "image":
            image, caption = self.items["images"][row], 0
        elif modality == "text":
            image_row, caption = self.items["text"][row]
            image = self.items["images"][image_row]
        else:
            image_row, number = self.items["audio"][row]
            image = self.items["images"][image_row]
            caption = image["utterances"][number]["caption"]
        captions = image["captions"]
        text = captions[caption] if caption < len(captions) else ""
        return Result(rank, score, image["key"], text, image["shard"], modality, captions, image["utterances"])


def check_k(k: int) -> None:
    if not 1 <= k <= MAX_K:
        raise ConfigError(f"k must be between 1 and {MAX_K} (got {k})")


class QueryEncoder:
    """Raw queries -> unit-length latents in the run's space (the run's model and the store's featurizer).
    With `onnx` (an `mm export --format onnx` folder of the index's run and checkpoint) the run's encoders run
    on onnxruntime: no model is built; the featurizer (tokenizer, image tower, log-mel) is the store's, as ever."""

    def __init__(self, manifest: dict, device: str = "auto", onnx: str | None = None):
        from trimodal.distributed import resolve_device
        from trimodal.features.query import QueryFeaturizer

        self.family = manifest["family"]
        if onnx is not None:
            from trimodal.export.runtime import OnnxEncoders

            self.model = OnnxEncoders(onnx)
            self.model.check_matches(manifest, "the index")
            self.device, self.episode_size = resolve_device(device), None
        else:
            from trimodal.training.eval_run import load_run
            from trimodal.training.run_storage import RunFolder
            from trimodal.training.trainer import CHECKPOINTS

            folder = RunFolder(manifest["run"])
            folder.fetch(["config.resolved.toml", f"{CHECKPOINTS}/{manifest['checkpoint']}.safetensors"])
            self.model, resolved, self.device = load_run(folder.local, manifest["checkpoint"], device)
            self.episode_size = int(resolved["train"]["batch_size"])  # a captioner's memory episode
        inputs = manifest["inputs"]
        self.featurizer = QueryFeaturizer(manifest["store_config"], self.device, image_input=inputs["image"],
                                          text_input=inputs.get("text", "ids"), text_spec=manifest.get("text_spec"))
        self.max_frames = int(manifest["max_audio_frames"])

    @property
    def captions(self) -> bool:
        """Whether the run generates captions (`caption` works)."""
        return bool(self.model.generates_captions)

    def caption(self, image: bytes, beams: int = 3) -> str:
        """The run's generated caption of an image file's bytes (a captioning family: bitmar)."""
        from trimodal.training.captions import generate_captions

        if not self.captions:
            limits = [line for line in getattr(self.model, "manifest", {}).get("not_exported", [])
                      if line.startswith("caption")]
            raise ConfigError(f"--caption with --onnx: {limits[0]}" if limits else
                              f"model family {self.family!r} does not generate captions")
        vector = self.featurizer.image_query(image).image
        (caption,), _ = generate_captions(self.model, vector[None], self.featurizer.tokenizer, self.device,
                                          beams=beams, episode_size=self.episode_size)
        return caption

    def encode(self, kind: str, query: str | bytes) -> np.ndarray:
        """(D,) float32: `query` (a caption, or image or audio file bytes) encoded as its modality's rows were."""
        import torch

        from trimodal.training.data import Item, collate

        if kind == "text":
            features = self.featurizer.text_query(query)
            item = Item("", tokens=features.tokens, text_features=features.text_features)
        elif kind == "image":
            item = Item("", image=self.featurizer.image_query(query).image)
        elif kind == "audio":
            item = Item("", mel=self.featurizer.audio_query(query, self.max_frames).frames)
        else:
            raise ConfigError(f"a query is text, image or audio (got {kind!r})")
        batch = collate([item], [kind])
        batch = {name: value.to(self.device) if torch.is_tensor(value) else value for name, value in batch.items()}
        with torch.no_grad():
            return self.model.encode(kind, batch)[0].float().cpu().numpy()


def search(index: SearchIndex, encoder: QueryEncoder, kind: str, query: str | bytes, *, modality: str | None = None,
           k: int = 10) -> list[Result]:
    """One query of `kind` against `modality` (default: images for text and audio, captions for images)."""
    check_k(k)
    if kind not in DEFAULT_IN:
        raise ConfigError(f"a query is text, image or audio (got {kind!r})")
    modality = modality or DEFAULT_IN[kind]
    index.check_modality(modality)
    return index.search(encoder.encode(kind, query), modality, k)
