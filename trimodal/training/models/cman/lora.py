"""The tops of pretrained towers, frozen, with LoRA (peft) on their attention projections.

`tower_top(modality, spec, adapt_blocks)` rebuilds the tower the feature store names (the same weights:
the weights file, or the fixed-seed random init) and keeps its last `adapt_blocks` blocks and its head;
the store must hold the states after block `depth - adapt_blocks` (`:layer=` when featurizing).

`add_lora` injects LoRA adapters with peft's `inject_adapter_in_model` into the projections that
`target_modules` names (by default each tower's attention projections) and freezes everything else:
open_clip's `nn.MultiheadAttention` keeps q, k and v in one `in_proj_weight` that peft cannot wrap as a
Linear, so those blocks are first rewritten with separate projections (`split_attention`, an exact
re-expression); torchaudio's wav2vec 2.0 / HuBERT layers already have `q_proj`, `k_proj`, `v_proj`,
`out_proj`; timm ViTs have a fused `qkv` and `proj`, which peft wraps as they are; WavLM computes q, k
and v from its `in_proj_weight` inside its own forward, so only its `out_proj` takes LoRA.
"""

from __future__ import annotations

import torch
from torch import nn

from trimodal.errors import ConfigError
from trimodal.features.image import parse_encoder
from trimodal.features.towers import OpenClipImageCut, OpenClipTextCut, SpeechCut, TimmVitCut, split_attention

ATTENTION_PROJECTIONS = {"open_clip": ["q_proj", "k_proj", "v_proj", "out_proj"],
                         "torchaudio": ["q_proj", "k_proj", "v_proj", "out_proj"],
                         "wavlm": ["out_proj"], "timm": ["qkv", "proj"]}
_FLAGS = {"image": ("--image", " --image-tokens"), "text": ("--text", " --text-tokens"), "audio": ("--audio", "")}


def _cut(modality: str, spec):
    if modality == "audio":
        from trimodal.features.speech import build_speech_model

        return SpeechCut(build_speech_model(spec)[0])
    if spec.family == "timm":
        from trimodal.features.timm_image import TimmImageEncoder

        return TimmVitCut(TimmImageEncoder(spec, torch.device("cpu"), tokens=True).model)
    from trimodal.features.open_clip_image import create_open_clip

    model, _ = create_open_clip(spec, "visual" if modality == "image" else "text", modality)
    return split_attention(OpenClipImageCut(model.visual) if modality == "image" else OpenClipTextCut(model))


def tower_top(modality: str, spec_text: str, adapt_blocks: int) -> nn.Module:
    """The last `adapt_blocks` blocks and the head of the tower `spec_text`, every parameter frozen."""
    families = ("torchaudio",) if modality == "audio" else ("open_clip", "timm")
    spec = parse_encoder(spec_text, families)
    cut = _cut(modality, spec)
    start = cut.depth - adapt_blocks
    if start < 0:
        raise ConfigError(f"cman: adapt_blocks = {adapt_blocks}, but the {modality} tower {spec.model} has "
                          f"{cut.depth} blocks")
    if spec.layer != start:
        flag, extra = _FLAGS[modality]
        base = ":".join(p for p in (spec.family, spec.model, spec.weights) if p)
        has = f"states after block {spec.layer}" if spec.layer is not None else "no states after a block"
        raise ConfigError(f"cman with adapt_blocks = {adapt_blocks} runs the last {adapt_blocks} blocks of the "
                          f"{modality} tower from the states after block {start}, but the store has {has}; "
                          f"featurize with {flag} {base}:layer={start}{extra} (or set adapt_blocks = 0)")
    top = cut.top(start)
    top.family = "wavlm" if getattr(top, "wavlm", False) else spec.family
    for parameter in top.parameters():
        parameter.requires_grad_(False)
    return top


def linear_names(module: nn.Module) -> list[str]:
    """The distinct last names of the Linear layers under `module`."""
    return sorted({name.rsplit(".", 1)[-1] for name, child in module.named_modules() if isinstance(child, nn.Linear)})


def add_lora(top: nn.Module, modality: str, *, rank: int, alpha: float, dropout: float,
             target_modules: list[str]) -> nn.Module:
    """LoRA adapters (peft) on `target_modules` (default: the tower's attention projections) of the tower
    top; afterwards only the adapters' parameters are trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    available = linear_names(top)
    targets = [t for t in (target_modules or ATTENTION_PROJECTIONS[top.family]) if t in available]
    if not targets:
        raise ConfigError(f"cman: target_modules {target_modules} name no Linear layer of the {modality} tower "
                          f"({top.family}); its Linear layers: {', '.join(available)}")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    inject_adapter_in_model(config, top)
    for name, parameter in top.named_parameters():
        parameter.requires_grad_("lora_" in name)
    top.lora_targets = targets
    return top
