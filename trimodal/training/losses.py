"""Symmetric InfoNCE (CLIP's loss) with a learnable temperature, over every pair of present modalities."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PAIRS = (("image", "text"), ("image", "audio"), ("text", "audio"))
MAX_LOGIT_SCALE = math.log(100.0)  # open_clip clamps the learned temperature the same way


def pair_name(first: str, second: str) -> str:
    return f"{first}-{second}"


def clip_loss(first: torch.Tensor, second: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """½[CE(s·A·Bᵀ, diag) + CE(s·B·Aᵀ, diag)] for unit-length rows of A and B."""
    logits = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp() * first @ second.T
    labels = torch.arange(len(first), device=first.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def multimodal_infonce(latents: dict[str, torch.Tensor], present: dict[str, torch.Tensor],
                       logit_scale: torch.Tensor, weights: dict[str, float] | None = None
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted mean of the pairwise losses, and each pair's loss. Only rows where both modalities of a
    pair are present take part; a pair with fewer than two such rows is skipped."""
    losses = {}
    for first, second in PAIRS:
        if first in latents and second in latents:
            rows = present[first] & present[second]
            if int(rows.sum()) >= 2:
                losses[pair_name(first, second)] = clip_loss(latents[first][rows], latents[second][rows], logit_scale)
    if not losses:
        raise ValueError("no pair of modalities is present in at least two samples of this batch")
    weights = weights or {}
    total_weight = sum(weights.get(name, 1.0) for name in losses)
    total = sum(weights.get(name, 1.0) * loss for name, loss in losses.items()) / total_weight
    return total, losses


def training_loss(model, latents: dict[str, torch.Tensor], present: dict[str, torch.Tensor],
                  weights: dict[str, float] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The model family's own loss when it defines `training_loss`, else `multimodal_infonce`."""
    custom = getattr(model, "training_loss", None)
    if custom is not None:
        return custom(latents, present, weights)
    return multimodal_infonce(latents, present, model.logit_scale, weights)
