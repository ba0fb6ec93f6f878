"""Image features: one way to build an image extractor from an `--image` value, and what extractors share.

A tower is named `<family>:<model>[:<weights>]`, the family looked up in a registry (`open_clip` in
`open_clip_image.py`, `timm` in `timm_image.py`). Without weights a tower runs with random
initialisation from a fixed seed, and says so; a local weights file is read with safetensors or
`torch.load(weights_only=True)` and its sha256 recorded. `precomputed` imports the vectors a dataset
ships (BabyLM's `.npy` files); `auto` picks from what the shards' `index.json` says they hold.

Every extractor has `needs_pixels`, `tokens`, `random_init`, `embed_dim` and `attrs()`. Towers
(`needs_pixels = True`) also have `pixels(blobs)` (PIL decoding and the model's CPU preprocessing),
`encode_pixels(pixels)`, `token_shape()` and `device_preprocess` (the same preprocessing as numbers the
device path in `decode.py` can run, or None); precomputed features have `embed_keys(keys)`.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trimodal.errors import ConfigError, TrimodalError

_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
RANDOM_INIT_SEED = 0
DEFAULT_TOWER = "open_clip:ViT-B-32"


@dataclass(frozen=True)
class EncoderSpec:
    family: str
    model: str
    weights: str | None = None
    layer: int | None = None  # `:layer=L`: states after block L (partial caching; 0 = the stem's output)

    def __str__(self) -> str:
        parts = [part for part in (self.family, self.model, self.weights) if part]
        return ":".join(parts + ([f"layer={self.layer}"] if self.layer is not None else []))

    @property
    def weights_is_file(self) -> bool:
        return self.weights is not None and (self.weights.endswith(_WEIGHT_SUFFIXES) or "/" in self.weights)


@dataclass(frozen=True)
class ImagePreprocess:
    """A tower's eval preprocessing as numbers: shortest edge resized, centre crop, mean/std.

    `crop_offset` says how an odd margin is split: "round" as torchvision's CenterCrop (open_clip),
    "floor" as Hugging Face's image processors (DINOv2's).
    """

    resize: int
    crop: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_offset: str = "round"

    @property
    def input_size(self) -> tuple[int, int]:
        return self.crop

    def attrs(self) -> dict:
        return {"resize_shortest_edge": self.resize, "crop": list(self.crop), "mean": list(self.mean),
                "std": list(self.std), "interpolation": self.interpolation, "crop_offset": self.crop_offset}


# -- the registry of tower families ---------------------------------------------------------------

_FAMILIES: dict[str, Callable[[EncoderSpec, torch.device, bool], "ImageTower"]] = {}


def register_image_family(name: str):
    """Register `builder(spec, device, tokens) -> tower` as the image family `name`."""

    def register(builder):
        _FAMILIES[name] = builder
        return builder

    return register


@register_image_family("open_clip")
def _open_clip(spec: EncoderSpec, device: torch.device, tokens: bool) -> "ImageTower":
    from trimodal.features.open_clip_image import OpenClipImageEncoder

    return OpenClipImageEncoder(spec, device, tokens=tokens)


@register_image_family("timm")
def _timm(spec: EncoderSpec, device: torch.device, tokens: bool) -> "ImageTower":
    from trimodal.features.timm_image import TimmImageEncoder

    return TimmImageEncoder(spec, device, tokens=tokens)


def image_families() -> list[str]:
    return list(_FAMILIES)


def parse_encoder(spec: str, families=None) -> EncoderSpec:
    """`<family>:<model>[:<weights>][:layer=L]`, the family one of `families` (default: the image families)."""
    families = _FAMILIES if families is None else families
    parts = spec.split(":")
    options = {}
    while len(parts) > 2 and "=" in parts[-1] and "/" not in parts[-1]:
        key, _, value = parts.pop().partition("=")
        options[key] = value
    usage = " or ".join(f"{family}:<model>[:<weights>][:layer=L]" for family in families)
    if len(parts) < 2 or parts[0] not in families or not parts[1]:
        raise ConfigError(f"encoder {spec!r} is not {usage}")
    unknown = sorted(set(options) - {"layer"})
    if unknown:
        raise ConfigError(f"encoder {spec!r}: unknown option {', '.join(unknown)} (the one option is layer=L)")
    layer = None
    if "layer" in options:
        if not options["layer"].isdigit():
            raise ConfigError(f"encoder {spec!r}: layer must be a block number (0 = the stem's output)")
        layer = int(options["layer"])
    return EncoderSpec(parts[0], parts[1], ":".join(parts[2:]) or None, layer)


def make_image_extractor(spec: str | None, device: torch.device, *, tokens: bool = False, index: dict | None = None,
                         shards: Path | None = None):
    """The extractor an `--image` value names, or None for no image features.

    `auto` is the default tower when the shards hold images (`index.json` modalities), the precomputed
    vectors when `index.json` has a `precomputed` section, else nothing; `precomputed` asks for those
    vectors; anything else is `<family>:<model>[:<weights>]`.
    """
    index = index or {}
    where = f"the shards in {shards}" if shards else "the shards"
    # Shards written before index.json listed modalities all hold images.
    has_pixels = "image" in index.get("modalities", ["image"])
    has_precomputed = "image/embedding" in (index.get("precomputed") or {})
    if spec == "auto":
        spec = DEFAULT_TOWER if has_pixels else "precomputed" if has_precomputed else None
    if spec in (None, "none"):
        return None
    if spec == "precomputed":
        if not has_precomputed:
            raise ConfigError(f"--image precomputed: {where} carry no precomputed image features "
                              "(index.json has no `precomputed` section); name an image encoder or none")
        if tokens:
            raise ConfigError("--image-tokens needs an image tower; precomputed image features have no patch tokens")
        from trimodal.features.precomputed import PrecomputedImageFeatures

        return PrecomputedImageFeatures(index, Path(shards) if shards else Path("."))
    try:
        encoder = parse_encoder(spec)
    except ConfigError:
        raise ConfigError(f"--image {spec!r} is not open_clip:<model>[:<pretrained tag or weights file>], "
                          "timm:<model>[:<weights file or tag>], precomputed, auto or none") from None
    if not has_pixels:
        instead = "--image precomputed, auto or none" if has_precomputed else "--image none"
        raise ConfigError(f"--image {spec} needs pixels, but {where} hold no images "
                          f"(modalities: {', '.join(index.get('modalities', []))}); use {instead}")
    return _FAMILIES[encoder.family](encoder, device, tokens)


# -- what towers share -----------------------------------------------------------------------------

def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Weights from a safetensors file or a weights-only torch checkpoint (unwrapping `state_dict`)."""
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # safetensors and torch raise assorted types for bad files
        raise ConfigError(f"cannot read weights file {path}: {error}") from error
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConfigError(f"weights file {path} holds a {type(state).__name__}, not a dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def seeded(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """`build()` under a fixed seed: a resumed or repeated run must draw the same random tower."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return build()


def layer_cut(cut, spec: EncoderSpec, tokens: bool):
    """`cut` checked for `spec.layer`: partial caching stores the states after that block as the tokens."""
    if not tokens:
        raise ConfigError(f"{spec}: layer={spec.layer} says where the tokens are taken; add --image-tokens")
    if spec.layer > cut.depth:
        raise ConfigError(f"{spec}: the tower has {cut.depth} blocks, so layer must be 0..{cut.depth}")
    return cut


class ImageTower:
    """What open_clip and timm towers share: PIL preprocessing, bf16 autocast on CUDA, numpy out.

    A subclass sets `spec`, `device`, `tokens`, `weights_sha256`, `embed_dim`, `transform` (PIL image ->
    tensor), `device_preprocess` and `input_size`, and implements `_forward(pixels) -> (pooled, tokens)`.
    """

    needs_pixels = True
    spec: EncoderSpec
    device: torch.device
    tokens: bool
    embed_dim: int
    transform: Callable
    device_preprocess: ImagePreprocess | None
    input_size: tuple[int, int]
    weights_sha256: str | None = None

    @property
    def random_init(self) -> bool:
        return self.spec.weights is None

    def _forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    cut = None  # a TowerCut when `spec.layer` asks for the states after a block

    def cut_forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pooled output of the whole tower and the states after block `spec.layer` on the way."""
        states, context = self.cut.embed(pixels)
        states = self.cut.run_blocks(states, context, 0, self.spec.layer)
        return self.cut.head(self.cut.run_blocks(states, context, self.spec.layer), context), states

    def layer_attrs(self) -> dict:
        if self.cut is None:
            return {}
        return {"layer": self.spec.layer, "depth": self.cut.depth,
                "tokens_are": f"the residual stream after block {self.spec.layer} of {self.cut.depth}, class token first"}

    def pixels(self, blobs: list[bytes]) -> torch.Tensor:
        try:
            return torch.stack([self.transform(Image.open(io.BytesIO(blob)).convert("RGB")) for blob in blobs])
        except OSError as error:
            raise TrimodalError(f"cannot decode an image: {error}") from error

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            pooled, tokens = self._forward(pixels.to(self.device, non_blocking=True))
        return pooled.float().cpu().numpy(), (tokens.float().cpu().numpy() if tokens is not None else None)

    def token_shape(self) -> list[int]:
        """(tokens, width) of the patch tokens one image gives."""
        _, tokens = self.encode_pixels(torch.zeros(1, 3, *self.input_size))
        return list(tokens.shape[1:])

    def __call__(self, blobs: list[bytes]) -> tuple[np.ndarray, np.ndarray | None]:
        return self.encode_pixels(self.pixels(blobs))
