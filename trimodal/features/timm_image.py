"""The `timm` image family, DINOv2 first: `timm:vit_base_patch14_dinov2[:<weights file or tag>]`.

The stored vector is the one BabyLM ships for its images: Hugging Face `Dinov2Model`'s `pooler_output`,
the CLS token after the final LayerNorm. timm gives exactly that with `global_pool='token'` and no head
(`num_classes=0`): `forward_head(forward_features(x))` is `norm(x)[:, 0]`. The tower is built for
224x224 inputs (`img_size=224`), what HF's `facebook/dinov2-*` processor feeds it (shortest edge to 256
bicubic, centre crop 224 with the margin floored, ImageNet mean/std), and the PIL path here does the
same. A checkpoint's position embeddings (DINOv2's are for 518x518) are resampled to the 16x16 grid once,
at load, by timm's `checkpoint_filter_fn` (bicubic, antialiased); HF interpolates them on every forward
pass instead, so the two agree to interpolation rounding. Patch tokens are `forward_features` without
its prefix tokens (CLS and any registers).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from trimodal.errors import ConfigError
from trimodal.features.image import (RANDOM_INIT_SEED, EncoderSpec, ImagePreprocess, ImageTower, file_sha256,
                                     layer_cut, load_state_dict, seeded)
from trimodal.features.towers import TimmVitCut

INPUT_SIZE = 224
RESIZE_SHORTEST = 256  # HF's dinov2 processor: crop_size 224 from shortest_edge 256


class TimmImageEncoder(ImageTower):
    """Batches of image bytes -> the normed CLS token (N, D) and optionally patch tokens (N, T, D)."""

    def __init__(self, spec: EncoderSpec, device: torch.device, *, tokens: bool = False):
        import timm

        if not timm.is_model(spec.model):
            raise ConfigError(f"unknown timm model {spec.model!r} (e.g. vit_base_patch14_dinov2, "
                              "vit_small_patch14_dinov2)")
        self.spec, self.device, self.tokens = spec, device, tokens
        model = self._create(timm, spec)
        self.model = model.eval().to(device)
        self.embed_dim = int(model.num_features)
        self.input_size = (INPUT_SIZE, INPUT_SIZE)
        cfg = model.pretrained_cfg or {}
        self.device_preprocess = ImagePreprocess(
            resize=RESIZE_SHORTEST, crop=self.input_size, mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
            std=tuple(cfg.get("std", (0.229, 0.224, 0.225))), interpolation="bicubic", crop_offset="floor")
        self.transform = _pil_transform(self.device_preprocess)
        self.cut = layer_cut(TimmVitCut(self.model), spec, tokens) if spec.layer is not None else None

    def _build(self, timm, name: str, pretrained: bool = False):
        try:
            return timm.create_model(name, pretrained=pretrained, num_classes=0, img_size=INPUT_SIZE,
                                     global_pool="token")
        except (TypeError, AssertionError, ValueError) as error:  # not a ViT with a CLS token
            raise ConfigError(f"timm model {self.spec.model} cannot be built as a {INPUT_SIZE}-pixel ViT pooled "
                              f"by its CLS token: {error}") from error

    def _create(self, timm, spec: EncoderSpec):
        if spec.weights is None:
            return seeded(lambda: self._build(timm, spec.model))
        if not spec.weights_is_file:
            try:
                return self._build(timm, f"{spec.model}.{spec.weights}", pretrained=True)
            except ConfigError:
                raise
            except Exception as error:  # hub failures come in many types
                raise ConfigError(f"cannot load pretrained weights {spec.weights!r} for {spec.model}: {error}; "
                                  "with no network, pass a local weights file instead") from error
        path = Path(spec.weights).expanduser()
        state = load_state_dict(path)
        self.weights_sha256 = file_sha256(path)
        model = self._build(timm, spec.model)
        module = importlib.import_module(type(model).__module__)
        filter_fn = getattr(module, "checkpoint_filter_fn", None)
        try:
            if filter_fn is not None:  # DINOv2's layout, 518-pixel position embeddings -> this model's
                state = filter_fn(state, model)
            missing, unexpected = model.load_state_dict(state, strict=False)
        except Exception as error:  # shapes that do not fit, or a layout the filter cannot read
            raise ConfigError(f"{path} does not hold the weights of timm model {spec.model}: {error}") from error
        unexpected = [k for k in unexpected if not k.startswith("head.")]  # a classifier we do not use
        if missing or unexpected:
            hint = ("; it looks like a Hugging Face transformers checkpoint: use timm's (e.g. the model.safetensors "
                    "of timm/vit_base_patch14_dinov2.lvd142m) or Meta's dinov2_vitb14_pretrain.pth"
                    if any(k.startswith("embeddings.") for k in unexpected) else "")
            raise ConfigError(f"{path} does not hold the weights of timm model {spec.model} ({len(missing)} missing "
                              f"tensors, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}){hint}")
        return model

    def attrs(self) -> dict:
        return {"encoder": str(self.spec), "family": self.spec.family, "model": self.spec.model,
                "weights": self.spec.weights, "weights_sha256": self.weights_sha256,
                "random_init": self.random_init,
                "random_init_seed": RANDOM_INIT_SEED if self.random_init else None, "embed_dim": self.embed_dim,
                "tokens": self.tokens, "pooling": "CLS token after the final LayerNorm (HF pooler_output)",
                "img_size": INPUT_SIZE, "preprocess": self.device_preprocess.attrs(), **self.layer_attrs()}

    def _forward(self, pixels: torch.Tensor):
        if self.cut is not None:
            return self.cut_forward(pixels)
        features = self.model.forward_features(pixels)
        pooled = self.model.forward_head(features)
        return pooled, (features[:, self.model.num_prefix_tokens :] if self.tokens else None)


def _pil_transform(preprocess: ImagePreprocess):
    from torchvision import transforms

    interpolation = transforms.InterpolationMode(preprocess.interpolation)
    return transforms.Compose([
        transforms.Resize(preprocess.resize, interpolation=interpolation),
        lambda image: _center_crop_floor(image, preprocess.crop),
        transforms.ToTensor(),
        transforms.Normalize(preprocess.mean, preprocess.std),
    ])


def _center_crop_floor(image, crop: tuple[int, int]):
    """HF's centre crop: the margin halved and floored (torchvision rounds it)."""
    height, width = crop
    top, left = (image.height - height) // 2, (image.width - width) // 2
    return image.crop((left, top, left + width, top + height))
