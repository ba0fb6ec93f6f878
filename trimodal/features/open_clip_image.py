"""The `open_clip` image family: the pooled embedding (and optionally patch tokens) of an open_clip tower.

`open_clip:<model>[:<pretrained tag or local weights file>]`; a tag downloads through open_clip's hub.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import torch

from trimodal.errors import ConfigError
from trimodal.features.image import (RANDOM_INIT_SEED, EncoderSpec, ImagePreprocess, ImageTower, file_sha256,
                                     layer_cut, load_state_dict, seeded)
from trimodal.features.towers import OpenClipImageCut


@contextmanager
def _quiet_open_clip():
    """open_clip logs "No pretrained weights loaded" at WARNING on the root logger; we say it ourselves."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


# The state-dict prefix of each open_clip tower: CLIP keeps its text tower at the top level.
_TOWER_KEYS = {"visual": ("visual.",), "text": ("transformer.", "token_embedding.", "text.")}


def create_open_clip(spec: EncoderSpec, tower: str, flag: str):
    """An open_clip model for `spec` (random init from the fixed seed, a local weights file, or a pretrained
    tag) and the sha256 of its weights file; `tower` ("visual" or "text") must be in the file."""
    import open_clip

    if spec.model not in open_clip.list_models():
        raise ConfigError(f"unknown open_clip model {spec.model!r} for --{flag} (e.g. ViT-B-32, ViT-S-32-alt, RN50)")
    with _quiet_open_clip():
        if spec.weights is None:
            return seeded(lambda: open_clip.create_model(spec.model, pretrained=None)), None
        if not spec.weights_is_file:
            try:
                return open_clip.create_model(spec.model, pretrained=spec.weights), None
            except Exception as error:  # hub failures come in many types
                raise ConfigError(f"cannot load pretrained weights {spec.weights!r} for {spec.model}: {error}; "
                                  "with no network, pass a local weights file instead") from error
        path = Path(spec.weights).expanduser()
        state = load_state_dict(path)
        model = open_clip.create_model(spec.model, pretrained=None)
    name = "image" if tower == "visual" else "text"
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # tensors of the wrong shape
        raise ConfigError(f"{path} does not hold the {name} tower of {spec.model}: {error}") from error
    prefixes = _TOWER_KEYS[tower]
    if any(k.startswith(prefixes) for k in missing) or not any(k.startswith(prefixes) for k in state):
        raise ConfigError(f"{path} does not hold the {name} tower of {spec.model} "
                          f"({len(missing)} missing and {len(unexpected)} unexpected tensors)")
    return model, file_sha256(path)


class OpenClipImageEncoder(ImageTower):
    """Batches of image bytes -> pooled embeddings (N, D) and optionally patch tokens (N, T, W)."""

    def __init__(self, spec: EncoderSpec, device: torch.device, *, tokens: bool = False):
        import open_clip

        self.spec, self.device, self.tokens = spec, device, tokens
        model, self.weights_sha256 = create_open_clip(spec, "visual", "image")
        self.visual = model.visual.eval().to(device)
        self.visual.output_tokens = tokens
        cfg = getattr(self.visual, "preprocess_cfg", {})
        self.transform = open_clip.image_transform(self.visual.image_size, is_train=False,
                                                   mean=cfg.get("mean"), std=cfg.get("std"),
                                                   interpolation=cfg.get("interpolation"),
                                                   resize_mode=cfg.get("resize_mode"))
        self.preprocess_cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}
        size = self.visual.image_size
        self.input_size = (size, size) if isinstance(size, int) else tuple(size)
        self.device_preprocess = _device_preprocess(cfg, self.input_size)
        self.embed_dim = int(self.visual.output_dim)
        self.cut = layer_cut(OpenClipImageCut(self.visual), spec, tokens) if spec.layer is not None else None

    def attrs(self) -> dict:
        return {"encoder": str(self.spec), "family": self.spec.family, "model": self.spec.model,
                "weights": self.spec.weights, "weights_sha256": self.weights_sha256,
                "random_init": self.random_init,
                "random_init_seed": RANDOM_INIT_SEED if self.random_init else None, "embed_dim": self.embed_dim,
                "tokens": self.tokens, "preprocess": self.preprocess_cfg, **self.layer_attrs()}

    def _forward(self, pixels: torch.Tensor):
        if self.cut is not None:
            return self.cut_forward(pixels)
        output = self.visual(pixels)
        return output if self.tokens else (output, None)


def _device_preprocess(cfg: dict, size: tuple[int, int]) -> ImagePreprocess | None:
    """open_clip's eval transform as numbers, where it is resize-shortest-edge then a square centre crop."""
    if cfg.get("resize_mode", "shortest") != "shortest" or size[0] != size[1] or "mean" not in cfg:
        return None  # 'longest' pads and 'squash' distorts: those stay on the PIL path
    return ImagePreprocess(resize=size[0], crop=size, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                           interpolation=cfg.get("interpolation") or "bicubic", crop_offset="round")
