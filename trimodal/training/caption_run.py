"""`mm caption`: a trained captioner's captions for image files, or for images already in a feature store."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from trimodal.errors import ConfigError, TrimodalError
from trimodal.features.store import FeatureStore
from trimodal.features.text import OpenClipTokenizer
from trimodal.training.captions import generate_captions
from trimodal.training.eval_run import load_run


def caption_run(run: Path, *, images: list[Path] = (), features: Path | None = None, keys: list[str] = (),
                beams: int = 3, checkpoint: str = "best", device: str = "auto") -> list[tuple[str, str]]:
    """(name, caption) for each image file, or each key of `features` (a store made like the run's)."""
    if bool(images) == bool(keys):
        raise ConfigError("name image files (--image FILE) or stored images (--features STORE --keys KEY …), "
                          "one or the other")
    if beams < 1:
        raise ConfigError(f"--beams must be at least 1 (got {beams})")
    model, resolved, target = load_run(Path(run), checkpoint, device)
    if not model.generates_captions:
        raise ConfigError(f"model family {resolved['model']['name']!r} does not generate captions")
    run_store = FeatureStore.open(Path(resolved["data"]["features"]))
    if images:
        vectors = _embed_files(images, run_store.config.get("image") or {}, target)
        names = [str(path) for path in images]
    else:
        store = FeatureStore.open(Path(features or resolved["data"]["features"]))
        _check_same_encoder(store.config.get("image") or {}, run_store.config.get("image") or {}, store.path)
        vectors, names = stored_images(store, list(keys)), list(keys)
    captions, _ = generate_captions(model, vectors, OpenClipTokenizer(run_store.config["text"]["tokenizer"]), target,
                                    beams=beams, episode_size=int(resolved["train"]["batch_size"]))
    return list(zip(names, captions))


def _embed_files(paths: list[Path], image_config: dict, device) -> np.ndarray:
    """The run's image encoder over image files, as `mm featurize` ran it."""
    from trimodal.features.image import make_image_extractor

    spec = image_config.get("encoder")
    if image_config.get("family") not in ("open_clip", "timm") or not spec:
        raise ConfigError("this run's image vectors came with the dataset (no image encoder ran), so image files "
                          "cannot be embedded like them; caption stored images with --features STORE --keys KEY …")
    from PIL import Image, UnidentifiedImageError

    blobs = []
    for path in paths:
        try:
            blobs.append(Path(path).read_bytes())
        except OSError as error:
            raise TrimodalError(f"cannot read image {path}: {error.strerror or error}") from error
        try:
            Image.open(io.BytesIO(blobs[-1])).verify()
        except (OSError, UnidentifiedImageError, SyntaxError) as error:  # PIL's errors for damaged files
            raise TrimodalError(f"{path} is not an image that can be decoded ({type(error).__name__})") from error
    extractor = make_image_extractor(spec, device, index={"modalities": ["image"]})
    pooled, _ = extractor(blobs)
    return pooled


def _check_same_encoder(image_config: dict, run_config: dict, where: Path) -> None:
    if image_config.get("encoder") != run_config.get("encoder") or image_config.get("embed_dim") != run_config.get("embed_dim"):
        raise ConfigError(f"{where} holds image vectors of {image_config.get('encoder')!r} "
                          f"({image_config.get('embed_dim')}-d), the run was trained on {run_config.get('encoder')!r}")


def stored_images(store: FeatureStore, keys: list[str]) -> np.ndarray:
    """The stored image vectors of `keys`, in that order; every key missing is named."""
    wanted, found = set(keys), {}
    for name in store.slots:
        part = store.read_shard(name, image=True, text=False, audio=False)
        for row, key in enumerate(part.keys):
            if key in wanted:
                found[key] = part.image[row]
        if len(found) == len(wanted):
            break
    missing = [key for key in keys if key not in found]
    if missing:
        raise TrimodalError(f"{store.path} has no image {', '.join(missing[:10])}"
                            + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""))
    return np.stack([found[key] for key in keys]).astype(np.float32)
