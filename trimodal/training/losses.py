"""Contrastive losses over every pair of present modalities: symmetric InfoNCE (CLIP's loss) with a learnable
temperature, and the VSE++ max-margin loss on hardest negatives."""

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


def max_margin_from_scores(scores: torch.Tensor, margin: float = 0.2, max_violation: bool = True) -> torch.Tensor:
    """VSE++ (Faghri et al.) on a square score matrix whose diagonal holds the positive pairs: for each
    positive, hinge [margin − s(i,i) + s(i,j)]₊ over the negatives of its row (first → second) and of its
    column (second → first); the hardest negative of each (`max_violation`, VSE++) or the sum over all
    of them (VSE0). Summed over the batch, as the reference code (fartashf/vsepp) does."""
    positives = scores.diag()
    negatives = torch.eye(len(scores), dtype=torch.bool, device=scores.device)
    row_costs = (margin - positives.unsqueeze(1) + scores).clamp(min=0).masked_fill(negatives, 0)
    column_costs = (margin - positives.unsqueeze(0) + scores).clamp(min=0).masked_fill(negatives, 0)
    if max_violation:
        return row_costs.max(dim=1).values.sum() + column_costs.max(dim=0).values.sum()
    return row_costs.sum() + column_costs.sum()


def max_margin_loss(first: torch.Tensor, second: torch.Tensor, margin: float = 0.2,
                    max_violation: bool = True) -> torch.Tensor:
    """`max_margin_from_scores` of the cosine similarities of unit-length rows of A and B."""
    return max_margin_from_scores(first @ second.T, margin, max_violation)


def multimodal_pairs(latents: dict[str, torch.Tensor], present: dict[str, torch.Tensor], pair_loss,
                     weights: dict[str, float] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted mean of `pair_loss(A, B)` over every pair of modalities, and each pair's loss. Only rows
    where both modalities of a pair are present take part; a pair with fewer than two such rows is skipped."""
    losses = {}
    for first, second in PAIRS:
        if first in latents and second in latents:
            rows = present[first] & present[second]
            if int(rows.sum()) >= 2:
                losses[pair_name(first, second)] = pair_loss(latents[first][rows], latents[second][rows])
    if not losses:
        raise ValueError("no pair of modalities is present in at least two samples of this batch")
    weights = weights or {}
    total_weight = sum(weights.get(name, 1.0) for name in losses)
    total = sum(weights.get(name, 1.0) * loss for name, loss in losses.items()) / total_weight
    return total, losses


def multimodal_infonce(latents: dict[str, torch.Tensor], present: dict[str, torch.Tensor],
                       logit_scale: torch.Tensor, weights: dict[str, float] | None = None
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`clip_loss` over every pair of present modalities (see `multimodal_pairs`)."""
    return multimodal_pairs(latents, present, lambda a, b: clip_loss(a, b, logit_scale), weights)


def multimodal_max_margin(latents: dict[str, torch.Tensor], present: dict[str, torch.Tensor], margin: float = 0.2,
                          max_violation: bool = True, weights: dict[str, float] | None = None
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`max_margin_loss` (both directions) over every pair of present modalities."""
    return multimodal_pairs(latents, present, lambda a, b: max_margin_loss(a, b, margin, max_violation), weights)
