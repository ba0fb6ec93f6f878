"""Continuum Memory System (Nested Learning, §7.1): transformer blocks whose single MLP is replaced by a
chain of residual MLP levels, y = MLP_k(… MLP_1(x)) (Eq. 70), each level later stepped by its own
optimizer on its own period (see `continuum.py`). Pre-norm and a residual per level, as the paper
advises in practice. Parameters of level `name` are those whose name contains `.levels.<name>.`.
"""

from __future__ import annotations

import torch
from torch import nn


class CMSLevel(nn.Module):
    """x + Linear(GELU(Linear(LayerNorm(x)))), `ratio` times wide inside: one memory level."""

    def __init__(self, dim: int, dropout: float, ratio: int = 4):
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, ratio * dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(ratio * dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class CMSBlock(nn.Module):
    """Pre-norm multi-head self-attention, then the chain of memory levels (fast first)."""

    def __init__(self, dim: int, heads: int, levels: list[str], dropout: float, ratio: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.levels = nn.ModuleDict({name: CMSLevel(dim, dropout, ratio) for name in levels})

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm(x)
        attended, _ = self.attention(h, h, h, key_padding_mask=padding_mask, need_weights=False)
        x = x + self.dropout(attended)
        for level in self.levels.values():
            x = level(x)
        return x


class CMSTransformer(nn.Module):
    """`depth` CMS blocks; called like `nn.TransformerEncoder` so the shared encoders can use it."""

    def __init__(self, dim: int, heads: int, depth: int, levels: list[str], dropout: float, ratio: int = 4):
        super().__init__()
        self.blocks = nn.ModuleList(CMSBlock(dim, heads, levels, dropout, ratio) for _ in range(depth))

    def forward(self, x: torch.Tensor, src_key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, src_key_padding_mask)
        return x


def level_parameters(model: nn.Module, levels: list[str]) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Every CMS level's parameters across the model, by level name."""
    return {name: [(n, p) for n, p in model.named_parameters() if f".levels.{name}." in n] for name in levels}
