"""Per-modality encoders that turn cached features into one vector each (shared by model families)."""

from __future__ import annotations

import math

import torch
from torch import nn

from trimodal.features.towers import exporting, masked_mean


def sinusoidal_positions(length: int, dim: int, device=None) -> torch.Tensor:
    position = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10_000.0) / dim))
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return table


def transformer(dim: int, heads: int, layers: int, dropout: float) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=dropout, activation="gelu",
                                       batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class TextEncoder(nn.Module):
    """Token ids (B, L), 0-padded -> (B, dim): embeddings + positions, Transformer, masked mean."""

    def __init__(self, vocab_size: int, context_length: int, dim: int, heads: int, layers: int, dropout: float,
                 backbone: nn.Module | None = None):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, dim)
        self.positions = nn.Parameter(torch.randn(context_length, dim) * 0.01)
        self.encoder = backbone if backbone is not None else transformer(dim, heads, layers, dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids, mask = trim_padding(ids)
        hidden = self.tokens(ids) + self.positions[: ids.shape[1]]
        hidden = self.encoder(hidden, src_key_padding_mask=~mask)
        return self.norm(masked_mean(hidden, mask))


def trim_padding(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """0-padded token ids (B, L) without the batch's all-padding tail, and their mask (ids != 0); all of
    them while exporting (`exporting`)."""
    mask = ids != 0
    if exporting():
        return ids, mask
    length = int(mask.sum(1).max().clamp(min=1))
    return ids[:, :length], mask[:, :length]


class ImageEncoder(nn.Module):
    """A cached pooled embedding (B, D) -> (B, dim) through an MLP; or patch tokens (B, T, W) through a
    small Transformer. A given `backbone` replaces both (a pooled embedding is then one token)."""

    def __init__(self, input_dim: int, dim: int, *, tokens: bool = False, heads: int = 4, layers: int = 1,
                 dropout: float = 0.1, backbone: nn.Module | None = None):
        super().__init__()
        self.tokens = tokens
        self.input = nn.Sequential(nn.LayerNorm(input_dim), nn.Linear(input_dim, dim))
        if backbone is not None or tokens:
            self.encoder = backbone if backbone is not None else transformer(dim, heads, layers, dropout)
        else:
            self.mlp = nn.Sequential(nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.input(features)
        if self.tokens:
            hidden = self.encoder(hidden + sinusoidal_positions(hidden.shape[1], hidden.shape[2], hidden.device)).mean(1)
        elif hasattr(self, "encoder"):
            hidden = self.encoder(hidden.unsqueeze(1)).squeeze(1)
        else:
            hidden = hidden + self.mlp(hidden)
        return self.norm(hidden)


class AudioEncoder(nn.Module):
    """Log-mel frames (B, T, n_mels) with a validity mask -> (B, dim): per-utterance normalisation, a
    strided convolutional front-end (4x fewer frames), Transformer, masked mean. Padding is zeroed before
    and between the convolutions, so an utterance's latent does not depend on how long the others in its
    batch are (nor, under torchrun, on which rank's batch it falls in)."""

    def __init__(self, n_mels: int, dim: int, heads: int, layers: int, dropout: float,
                 backbone: nn.Module | None = None):
        super().__init__()
        self.frontend = nn.Sequential(
            nn.Conv1d(n_mels, dim, kernel_size=5, stride=2, padding=2), nn.GELU(),
            nn.Conv1d(dim, dim, kernel_size=5, stride=2, padding=2), nn.GELU(),
        )
        self.encoder = backbone if backbone is not None else transformer(dim, heads, layers, dropout)
        self.norm = nn.LayerNorm(dim)

    def frames(self, mel: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The front-end's frames (B, T/4, dim) with positions, and their validity mask (a frame is valid
        when its first source frame was)."""
        weights = mask.unsqueeze(-1).to(mel.dtype)
        count = weights.sum(1, keepdim=True).clamp(min=1.0)
        mean = (mel * weights).sum(1, keepdim=True) / count
        std = (((mel - mean) ** 2 * weights).sum(1, keepdim=True) / count).sqrt().clamp(min=1e-3)
        mel = (mel - mean) / std * weights
        first, first_activation, second, second_activation = self.frontend
        hidden = first_activation(first(mel.transpose(1, 2)))
        hidden = hidden * mask[:, ::2][:, : hidden.shape[2]].unsqueeze(1).to(hidden.dtype)
        hidden = second_activation(second(hidden)).transpose(1, 2)
        mask = mask[:, ::4][:, : hidden.shape[1]]
        return hidden + sinusoidal_positions(hidden.shape[1], hidden.shape[2], hidden.device), mask

    def forward(self, mel: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden, mask = self.frames(mel, mask)
        hidden = self.encoder(hidden, src_key_padding_mask=~mask)
        return self.norm(masked_mean(hidden, mask))


def run_encoder(encoders: nn.ModuleDict, modality: str, batch: dict, image_tokens: bool = False):
    """`encoders[modality]` on its inputs in `batch`: image embeddings (or patch tokens), caption token
    ids, or mels with their mask. Shared by the model families."""
    if modality == "image":
        return encoders["image"](batch["image_tokens"] if image_tokens else batch["image"])
    if modality == "text":
        return encoders["text"](batch["text"])
    return encoders["audio"](batch["audio"], batch["audio_mask"])
