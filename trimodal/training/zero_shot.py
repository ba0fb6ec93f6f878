"""`mm eval --model open_clip:<model>[:<weights>]`: a pretrained open_clip model's zero-shot image↔text
retrieval on a split, scored exactly as `mm eval` scores a run (`score_latents`: multi-positive R@1/5/10,
median rank, chance; folds), and written as `OUT/eval-<split>.json` in a run's layout, so a run and CLIP
zero-shot sit in one table.

Each modality comes from the feature store when featurize ran the same tower (its pooled image vectors; its
text tower's caption embeddings), otherwise from the shards: the jpgs through the model's own eval
transform, every line of `KEY.txt` through its tokenizer. The latents are L2-normalised, as open_clip's
and CLIP_benchmark's retrieval do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trimodal.atomic import write_json
from trimodal.distributed import resolve_device
from trimodal.errors import ConfigError, TrimodalError
from trimodal.progress import SILENT, Reporter
from trimodal.storage import location, prepare_folder, storage_errors
from trimodal.training.evaluate import fold_sizes, mean_over_folds, mean_recall, score_folds, score_latents

FAMILY = "open_clip"


@dataclass(frozen=True)
class PretrainedOptions:
    split: str = "test"
    features: str | None = None  # a store of the shards: its vectors are used where featurize ran this tower
    folds: int | None = None
    device: str = "auto"
    batch_size: int = 64


def parse_model(model: str):
    """`open_clip:<model>[:<pretrained tag or weights file>]` as an EncoderSpec (no `layer=`)."""
    from trimodal.features.image import parse_encoder

    try:
        spec = parse_encoder(model, (FAMILY,))
    except ConfigError:
        raise ConfigError(f"--model {model!r} is not open_clip:<model>[:<pretrained tag or weights file>] "
                          "(e.g. open_clip:ViT-B-32:openai)") from None
    if spec.layer is not None:
        raise ConfigError(f"--model {model}: layer= cuts a tower for caching; a zero-shot model is the whole tower")
    return spec


def evaluate_pretrained(model: str, shards: str, out: str, options: PretrainedOptions = PretrainedOptions(), *,
                        reporter: Reporter = SILENT) -> dict:
    """Score `model` zero-shot on `options.split` of `shards`; write and return `out/eval-<split>.json`."""
    from trimodal.pipeline.read.index import read_index

    spec = parse_model(model)
    if options.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1 (got {options.batch_size})")
    shards, out = location(shards), location(out)
    index = read_index(shards)
    if options.split not in index["splits"]:
        raise ConfigError(f"{shards} has no split {options.split!r} (it has {', '.join(index['splits'])})")
    device = resolve_device(options.device)
    keys, blobs, captions, caption_image = _read_split(shards, index, options.split, reporter)
    if not keys or not captions:
        raise TrimodalError(f"split {options.split!r} of {shards} has no {'images' if not keys else 'captions'} "
                            "to score")
    stored = (_stored(spec, shards, options.features, options.split, keys, caption_image)
              if options.features else {})
    sizes = fold_sizes(len(keys), options.folds) if options.folds is not None else None

    if "image" in stored:
        images = stored["image"]
    else:
        images = _encode_images(spec, device, index, shards, blobs, options.batch_size, reporter)
    if "text" in stored:
        texts = stored["text"]
    else:
        texts = _encode_captions(spec, device, captions, options.batch_size, reporter)
    latents = {"image": torch.nn.functional.normalize(torch.as_tensor(images, dtype=torch.float32), dim=-1),
               "text": torch.nn.functional.normalize(torch.as_tensor(texts, dtype=torch.float32), dim=-1)}
    groups = {"image": np.arange(len(keys)), "text": np.asarray(caption_image, dtype=np.int64)}
    result = {"split": options.split, "checkpoint": None, "model": str(spec), "zero_shot": True,
              "shards": str(shards), "images": len(keys), "captions": len(captions), "utterances": 0,
              "directions": score_latents(latents, groups), "ttt": False,
              "from_store": sorted(stored), "random_init": spec.weights is None}
    result["mean_recall"] = mean_recall(result["directions"])
    if sizes is not None:
        result["folds"] = {"count": options.folds, "images": sizes}
        result["directions_folds"] = score_folds(latents, groups, sizes)
        result["directions_1k"] = mean_over_folds(result["directions_folds"])
    with storage_errors(f"writing the evaluation to {out}"):
        prepare_folder(out)
        write_json(out / f"eval-{options.split}.json", result)
    return result


def _read_split(shards, index: dict, split: str, reporter: Reporter):
    """Keys, image bytes, captions and each caption's image row, in shard order (what featurize reads)."""
    from trimodal.pipeline.read.shards import read_shard

    keys, blobs, captions, caption_image = [], [], [], []
    entries = index["splits"][split]["shards"]
    with reporter.task(f"read {split}", total=len(entries), unit="shards") as task:
        for entry in entries:
            with storage_errors(f"reading {shards / entry['name']}"):
                contents = read_shard(shards / entry["name"], images=True, audio=False)
            for row, (key, image, count) in enumerate(zip(contents.keys, contents.images, contents.caption_counts)):
                if image is None:
                    raise TrimodalError(f"{key} in {shards / entry['name']} has no image: zero-shot retrieval "
                                        "needs every image of the split")
                caption_image += [len(keys)] * count
                keys.append(key)
                blobs.append(image)
            captions += contents.captions
            task.advance(1)
    return keys, blobs, captions, caption_image


def _same_tower(record: dict | None, spec) -> bool:
    """Whether a store's featurizer record is this model's tower (same weights, whole pooled output)."""
    from trimodal.features.image import file_sha256

    if not record or record.get("family") != spec.family or record.get("model") != spec.model:
        return False
    if record.get("weights") != spec.weights:
        return False
    if spec.weights_is_file:
        from pathlib import Path

        path = Path(spec.weights).expanduser()
        return path.is_file() and record.get("weights_sha256") == file_sha256(path)
    return True


def _stored(spec, shards, features: str, split: str, keys: list[str], caption_image: list[int]) -> dict[str, np.ndarray]:
    """{"image": vectors, "text": embeddings} that the store holds from this very tower (either may be absent)."""
    from trimodal.training.data import load_split, open_sources

    sources = open_sources(shards, features, [split])
    config = sources.store.config
    image = _same_tower(config.get("image"), spec) and "image/embedding" in sources.store.group
    text = _same_tower((config.get("text") or {}).get("tower"), spec) and "text/embedding" in sources.store.group
    if not image and not text:
        return {}
    inputs = {"image": "embedding", "text": "embedding" if text else "ids"}
    data = load_split(sources, split, ["image", "text"] if text else ["image"], inputs=inputs)
    if list(data.keys) != keys or (text and np.asarray(data.caption_image).tolist() != caption_image):
        raise ConfigError(f"{features} holds other rows of {split!r} than {shards}")
    stored = {}
    if image:
        stored["image"] = np.stack([np.asarray(v, dtype=np.float32) for v in data.images])
    if text:
        stored["text"] = np.stack([np.asarray(v, dtype=np.float32) for v in data.text_features])
    return stored


def _encode_images(spec, device, index, shards, blobs, batch_size: int, reporter: Reporter) -> np.ndarray:
    from trimodal.features.image import make_image_extractor

    tower = make_image_extractor(str(spec), device, index=index, shards=shards)
    vectors = []
    with reporter.task("encode images", total=len(blobs), unit="images") as task:
        for start in range(0, len(blobs), batch_size):
            pooled, _ = tower(blobs[start : start + batch_size])
            vectors.append(pooled)
            task.advance(len(pooled))
    return np.concatenate(vectors)


def _encode_captions(spec, device, captions: list[str], batch_size: int, reporter: Reporter) -> np.ndarray:
    from trimodal.features.text import OpenClipTextTower, OpenClipTokenizer

    tokenizer, tower = OpenClipTokenizer(f"{FAMILY}:{spec.model}"), OpenClipTextTower(spec, device)
    vectors = []
    with reporter.task("encode captions", total=len(captions), unit="captions") as task:
        for start in range(0, len(captions), batch_size):
            pooled, _ = tower(tokenizer(captions[start : start + batch_size]), batch_size)
            vectors.append(pooled)
            task.advance(len(pooled))
    return np.concatenate(vectors)
