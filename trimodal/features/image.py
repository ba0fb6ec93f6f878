"""Image features: the pooled embedding (and optionally patch tokens) of an open_clip image tower.

An encoder is named `open_clip:<model>[:<pretrained tag or local weights file>]`. Without weights the
tower runs with random initialisation, and says so; a local file is read with safetensors or
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import io
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trimodal.errors import ConfigError, TrimodalError

_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
RANDOM_INIT_SEED = 0


@dataclass(frozen=True)
class EncoderSpec:
    family: str
    model: str
    weights: str | None = None

    def __str__(self) -> str:
        return ":".join(part for part in (self.family, self.model, self.weights) if part)

    @property
    def weights_is_file(self) -> bool:
        return self.weights is not None and (self.weights.endswith(_WEIGHT_SUFFIXES) or "/" in self.weights)


def parse_encoder(spec: str) -> EncoderSpec:
    parts = spec.split(":", 2)
    if len(parts) < 2 or parts[0] != "open_clip" or not parts[1]:
        raise ConfigError(f"encoder {spec!r} is not open_clip:<model>[:<pretrained tag or weights file>]")
    return EncoderSpec(parts[0], parts[1], parts[2] if len(parts) == 3 and parts[2] else None)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda (got {device!r})")
    return torch.device(device)


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
    return {k.removeprefix("module."): v for k, v in state.items()}


@contextmanager
def _quiet_open_clip():
    """open_clip logs "No pretrained weights loaded" at WARNING on the root logger; we say it ourselves."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


class OpenClipImageEncoder:
    """Batches of image bytes -> pooled embeddings (N, D) and optionally patch tokens (N, T, W)."""

    def __init__(self, spec: EncoderSpec, device: torch.device, *, tokens: bool = False):
        import open_clip

        if spec.model not in open_clip.list_models():
            raise ConfigError(f"unknown open_clip model {spec.model!r} (e.g. ViT-B-32, ViT-S-32-alt, RN50)")
        self.spec, self.device, self.tokens = spec, device, tokens
        self.weights_sha256 = None
        with _quiet_open_clip():
            model = self._create(open_clip, spec)
        self.visual = model.visual.eval().to(device)
        self.visual.output_tokens = tokens
        cfg = getattr(self.visual, "preprocess_cfg", {})
        self.preprocess = open_clip.image_transform(self.visual.image_size, is_train=False,
                                                    mean=cfg.get("mean"), std=cfg.get("std"),
                                                    interpolation=cfg.get("interpolation"),
                                                    resize_mode=cfg.get("resize_mode"))
        self.preprocess_cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}
        self.embed_dim = int(self.visual.output_dim)

    def _create(self, open_clip, spec: EncoderSpec):
        if spec.weights is None:
            # A fixed seed: a resumed or repeated run must draw the same random tower.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_INIT_SEED)
                return open_clip.create_model(spec.model, pretrained=None)
        if spec.weights_is_file:
            path = Path(spec.weights).expanduser()
            state = load_state_dict(path)
            self.weights_sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
            model = open_clip.create_model(spec.model, pretrained=None)
            missing, unexpected = model.load_state_dict(state, strict=False)
            if any(k.startswith("visual.") for k in missing) or not any(k.startswith("visual.") for k in state):
                raise ConfigError(f"{path} does not hold the image tower of {spec.model} "
                                  f"({len(missing)} missing and {len(unexpected)} unexpected tensors)")
            return model
        try:
            return open_clip.create_model(spec.model, pretrained=spec.weights)
        except Exception as error:  # hub failures come in many types
            raise ConfigError(f"cannot load pretrained weights {spec.weights!r} for {spec.model}: {error}; "
                              "with no network, pass a local weights file instead") from error

    @property
    def random_init(self) -> bool:
        return self.spec.weights is None

    def attrs(self) -> dict:
        return {"encoder": str(self.spec), "family": self.spec.family, "model": self.spec.model,
                "weights": self.spec.weights, "weights_sha256": self.weights_sha256,
                "random_init": self.random_init,
                "random_init_seed": RANDOM_INIT_SEED if self.random_init else None, "embed_dim": self.embed_dim, "tokens": self.tokens,
                "preprocess": self.preprocess_cfg}

    def pixels(self, blobs: list[bytes]) -> torch.Tensor:
        try:
            return torch.stack([self.preprocess(Image.open(io.BytesIO(blob)).convert("RGB")) for blob in blobs])
        except OSError as error:
            raise TrimodalError(f"cannot decode an image: {error}") from error

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            output = self.visual(pixels.to(self.device, non_blocking=True))
        pooled, tokens = output if self.tokens else (output, None)
        return pooled.float().cpu().numpy(), (tokens.float().cpu().numpy() if tokens is not None else None)

    def __call__(self, blobs: list[bytes]) -> tuple[np.ndarray, np.ndarray | None]:
        return self.encode_pixels(self.pixels(blobs))
