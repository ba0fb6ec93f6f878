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
                                     load_state_dict, seeded)


@contextmanager
def _quiet_open_clip():
    """open_clip logs "No pretrained weights loaded" at WARNING on the root logger; we say it ourselves."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


class OpenClipImageEncoder(ImageTower):
    """Batches of image bytes -> pooled embeddings (N, D) and optionally patch tokens (N, T, W)."""

    def __init__(self, spec: EncoderSpec, device: torch.device, *, tokens: bool = False):
        import open_clip

        if spec.model not in open_clip.list_models():
            raise ConfigError(f"unknown open_clip model {spec.model!r} (e.g. ViT-B-32, ViT-S-32-alt, RN50)")
        self.spec, self.device, self.tokens = spec, device, tokens
        with _quiet_open_clip():
            model = self._create(open_clip, spec)
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

    def _create(self, open_clip, spec: EncoderSpec):
        if spec.weights is None:
            return seeded(lambda: open_clip.create_model(spec.model, pretrained=None))
        if spec.weights_is_file:
            path = Path(spec.weights).expanduser()
            state = load_state_dict(path)
            self.weights_sha256 = file_sha256(path)
            model = open_clip.create_model(spec.model, pretrained=None)
            try:
                missing, unexpected = model.load_state_dict(state, strict=False)
            except RuntimeError as error:  # tensors of the wrong shape
                raise ConfigError(f"{path} does not hold the image tower of {spec.model}: {error}") from error
            if any(k.startswith("visual.") for k in missing) or not any(k.startswith("visual.") for k in state):
                raise ConfigError(f"{path} does not hold the image tower of {spec.model} "
                                  f"({len(missing)} missing and {len(unexpected)} unexpected tensors)")
            return model
        try:
            return open_clip.create_model(spec.model, pretrained=spec.weights)
        except Exception as error:  # hub failures come in many types
            raise ConfigError(f"cannot load pretrained weights {spec.weights!r} for {spec.model}: {error}; "
                              "with no network, pass a local weights file instead") from error

    def attrs(self) -> dict:
        return {"encoder": str(self.spec), "family": self.spec.family, "model": self.spec.model,
                "weights": self.spec.weights, "weights_sha256": self.weights_sha256,
                "random_init": self.random_init,
                "random_init_seed": RANDOM_INIT_SEED if self.random_init else None, "embed_dim": self.embed_dim,
                "tokens": self.tokens, "preprocess": self.preprocess_cfg}

    def _forward(self, pixels: torch.Tensor):
        output = self.visual(pixels)
        return output if self.tokens else (output, None)


def _device_preprocess(cfg: dict, size: tuple[int, int]) -> ImagePreprocess | None:
    """open_clip's eval transform as numbers, where it is resize-shortest-edge then a square centre crop."""
    if cfg.get("resize_mode", "shortest") != "shortest" or size[0] != size[1] or "mean" not in cfg:
        return None  # 'longest' pads and 'squash' distorts: those stay on the PIL path
    return ImagePreprocess(resize=size[0], crop=size, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                           interpolation=cfg.get("interpolation") or "bicubic", crop_offset="round")
