"""`dualloop` — a fusion network trained with a double loop.

Inner loop: per-modality encoders turn the cached features into token sequences with padding masks,
tagged by a learned modality-type embedding; one fusion layer ("early": a joint Transformer over the
concatenated tokens; "late": a softmax-weighted mean of per-modality pooled vectors through a shared
MLP; "cross": learned latent queries cross-attending to the tokens) turns ANY non-empty subset of
modalities into one vector, projected to unit length. Retrieval embeds each item by fusing its one
modality alone (`encode`), so images, captions and utterances share one space; `forward` also returns
"fused", the fusion of every modality present in a row, which the loss pulls toward each of them.

Outer loop: a learned controller scales the learning rate every `update_frequency` steps
(`controller.py`); its parameters live in `model.controller` so they are saved with the weights.

Task heads: none — no dataset here (Flickr8k + FACC, COCO, BabyLM, the mini set) has a label field.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trimodal.errors import ConfigError
from trimodal.training.settings import TrainConfig
from trimodal.training.models.dualloop.controller import ControlledOptimization, LearningRateController
from trimodal.training.losses import clip_loss, multimodal_infonce
from trimodal.training.models import register_model
from trimodal.training.models.encoders import (AudioEncoder, ImageEncoder, TextEncoder, masked_mean,
                                                run_encoder, sinusoidal_positions, transformer, trim_padding)
from trimodal.training.models.family import MODALITIES, Family, present_modalities

FUSIONS = ("early", "late", "cross")

Tokens = tuple[torch.Tensor, torch.Tensor]  # (B, T, dim) states and their (B, T) validity mask


def attendable(mask: torch.Tensor) -> torch.Tensor:
    """`mask`, with rows that have no valid token opened up entirely: attention over nothing is NaN,
    and such a row (an absent modality) is masked out of every pooling anyway."""
    return mask | ~mask.any(dim=1, keepdim=True)


# -- token-returning front-ends (the shared encoders, stopped before pooling) ---------------------

class TextTokens(TextEncoder):
    def forward(self, ids: torch.Tensor) -> Tokens:
        ids, mask = trim_padding(ids)
        hidden = self.encoder(self.tokens(ids) + self.positions[: ids.shape[1]], src_key_padding_mask=~attendable(mask))
        return self.norm(hidden), mask


class ImageTokens(ImageEncoder):
    """Patch tokens through the Transformer, or a pooled embedding as one token."""

    def forward(self, features: torch.Tensor) -> Tokens:
        hidden = self.input(features)
        if self.tokens:
            hidden = self.encoder(hidden + sinusoidal_positions(hidden.shape[1], hidden.shape[2], hidden.device))
        else:
            hidden = (hidden + self.mlp(hidden)).unsqueeze(1)
        return self.norm(hidden), torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)


class AudioTokens(AudioEncoder):
    """As AudioEncoder, stopped before pooling."""

    def forward(self, mel: torch.Tensor, mask: torch.Tensor) -> Tokens:
        hidden, mask = self.frames(mel, mask)
        hidden = self.encoder(hidden, src_key_padding_mask=~attendable(mask))
        return self.norm(hidden), mask


# -- fusion layers: {modality: tokens} of any non-empty subset -> (B, dim) -------------------------

def concatenated(parts: dict[str, Tokens]) -> Tokens:
    return torch.cat([hidden for hidden, _ in parts.values()], 1), torch.cat([mask for _, mask in parts.values()], 1)


class EarlyFusion(nn.Module):
    """A joint pre-norm Transformer over the concatenated tokens, then their masked mean."""

    def __init__(self, dim: int, heads: int, layers: int, dropout: float):
        super().__init__()
        self.joint = transformer(dim, heads, layers, dropout)

    def forward(self, parts: dict[str, Tokens]) -> torch.Tensor:
        hidden, mask = concatenated(parts)
        return masked_mean(self.joint(hidden, src_key_padding_mask=~attendable(mask)), mask)


class LateFusion(nn.Module):
    """Each modality's pooled vector through one shared residual MLP; a softmax-weighted mean (learned
    weight per modality) over the modalities present in the row."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(4 * dim, dim))
        self.modality_logits = nn.Parameter(torch.zeros(len(MODALITIES)))

    def forward(self, parts: dict[str, Tokens]) -> torch.Tensor:
        pooled = torch.stack([masked_mean(hidden, mask) for hidden, mask in parts.values()], 1)  # (B, M, dim)
        pooled = pooled + self.mlp(pooled)
        present = torch.stack([mask.any(1) for _, mask in parts.values()], 1)  # (B, M)
        logits = self.modality_logits[[MODALITIES.index(m) for m in parts]].to(pooled.dtype)
        logits = logits.expand_as(present).masked_fill(~attendable(present), -torch.inf)
        return (logits.softmax(1).unsqueeze(-1) * pooled).sum(1)


class CrossRound(nn.Module):
    """Latents += cross-attention(latents -> tokens); latents += MLP(latents); pre-norm."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.query_norm, self.context_norm, self.mlp_norm = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))

    def forward(self, latents: torch.Tensor, context: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        context = self.context_norm(context)
        read, _ = self.attention(self.query_norm(latents), context, context, key_padding_mask=padding,
                                 need_weights=False)
        latents = latents + read
        return latents + self.mlp(self.mlp_norm(latents))


class CrossFusion(nn.Module):
    """`queries` learned latents read the concatenated tokens for `layers` rounds; their mean."""

    def __init__(self, dim: int, heads: int, layers: int, queries: int, dropout: float):
        super().__init__()
        self.query_embedding = nn.Parameter(torch.randn(queries, dim) * 0.02)  # "embedding": no weight decay
        self.rounds = nn.ModuleList([CrossRound(dim, heads, dropout) for _ in range(layers)])

    def forward(self, parts: dict[str, Tokens]) -> torch.Tensor:
        hidden, mask = concatenated(parts)
        latents = self.query_embedding.unsqueeze(0).expand(hidden.shape[0], -1, -1).to(hidden.dtype)
        padding = ~attendable(mask)
        for round_ in self.rounds:
            latents = round_(latents, hidden, padding)
        return latents.mean(1)


# -- the model ---------------------------------------------------------------------------------------

class DualLoopModel(Family):
    def __init__(self, *, image_dim: int, image_tokens: bool, image_token_dim: int, vocab_size: int,
                 context_length: int, n_mels: int, model_dim: int, latent_dim: int, heads: int, layers: int,
                 fusion: str, fusion_layers: int, fusion_tokens: int, fused_weight: float, dropout: float,
                 update_frequency: int, controller_hidden: int, lr_multiplier_min: float, lr_multiplier_max: float,
                 controller_lr: float, exploration: float):
        super().__init__()
        self.image_tokens, self.fused_weight = image_tokens, fused_weight
        self.update_frequency, self.controller_lr = update_frequency, controller_lr
        self.encoders = nn.ModuleDict({
            "image": ImageTokens(image_token_dim if image_tokens else image_dim, model_dim, tokens=image_tokens,
                                 heads=heads, layers=layers, dropout=dropout),
            "text": TextTokens(vocab_size, context_length, model_dim, heads, layers, dropout),
            "audio": AudioTokens(n_mels, model_dim, heads, layers, dropout),
        })
        self.type_embedding = nn.Embedding(len(MODALITIES), model_dim)
        if fusion == "early":
            self.fusion = EarlyFusion(model_dim, heads, fusion_layers, dropout)
        elif fusion == "late":
            self.fusion = LateFusion(model_dim, dropout)
        else:
            self.fusion = CrossFusion(model_dim, heads, fusion_layers, fusion_tokens, dropout)
        self.norm = nn.LayerNorm(model_dim)
        self.projection = nn.Linear(model_dim, latent_dim)  # one for all modalities: one shared space
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.controller = LearningRateController(controller_hidden, lr_multiplier_min, lr_multiplier_max, exploration)

    # -- encoding ---------------------------------------------------------------------------------

    def tokens(self, modality: str, batch: dict) -> Tokens:
        """A modality's tagged tokens; rows whose `<modality>_present` is False have no valid token."""
        hidden, mask = run_encoder(self.encoders, modality, batch, self.image_tokens)
        present = batch.get(f"{modality}_present")
        if present is not None:
            mask = mask & present.to(mask.device).unsqueeze(1)
        return hidden + self.type_embedding.weight[MODALITIES.index(modality)], mask

    def fuse(self, parts: dict[str, Tokens]) -> torch.Tensor:
        return F.normalize(self.projection(self.norm(self.fusion(parts))).float(), dim=-1)

    def cross_modal_attention(self) -> list[str]:
        """The fusion layer's attention: it attends over the tokens of every modality present."""
        return [name for name, module in self.named_modules()
                if name.startswith("fusion.") and isinstance(module, nn.MultiheadAttention)]

    def encode(self, modality: str, batch: dict) -> torch.Tensor:
        """Unit-length latents (B, latent_dim): the fusion of this one modality alone."""
        return self.fuse({modality: self.tokens(modality, batch)})

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Each present modality's own latents, and "fused": the fusion of all of them."""
        present = present_modalities(self, batch)
        parts = {modality: self.tokens(modality, batch) for modality in present}
        latents = {modality: self.fuse({modality: parts[modality]}) for modality in present}
        latents["fused"] = self.fuse(parts)
        return latents

    # -- the trainer's hooks ----------------------------------------------------------------------

    def training_loss(self, latents: dict[str, torch.Tensor], present: dict[str, torch.Tensor],
                      weights: dict[str, float] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """InfoNCE between the modalities + fused_weight × the mean InfoNCE between the fused latents and
        each modality, over the rows that have it."""
        unimodal = {m: latents[m] for m in MODALITIES if m in latents}
        total, losses = multimodal_infonce(unimodal, present, self.logit_scale, weights)
        fused = {}
        for modality, modality_latents in unimodal.items():
            rows = present.get(modality)
            if rows is not None and int(rows.sum()) >= 2:
                fused[f"fused-{modality}"] = clip_loss(latents["fused"][rows], modality_latents[rows], self.logit_scale)
        if fused:
            total = total + self.fused_weight * sum(fused.values()) / len(fused)
        return total, {**losses, **fused}

    def make_optimization(self, train: TrainConfig, total_steps: int) -> ControlledOptimization:
        """AdamW at the schedule's rate × the controller's multiplier. Under torchrun rank 0 decides each
        window's multiplier and every rank applies it (see `ControlledOptimization`)."""
        return ControlledOptimization(self, train, total_steps, self.controller,
                                      update_frequency=self.update_frequency, controller_lr=self.controller_lr)

    def plots(self, records: list[dict], folder) -> list:
        from trimodal.training.plots import plot_series

        return plot_series(records, "controller", (("lr_multiplier", "learning-rate multiplier"),
                                                  ("reward", "reward of the last window")),
                            folder / "optimization.png")


@register_model("dualloop")
def dualloop(*, image_dim: int = 512, image_tokens: bool = False, image_token_dim: int = 768,
             vocab_size: int = 49408, context_length: int = 77, n_mels: int = 80, model_dim: int = 256,
             latent_dim: int = 256, heads: int = 4, layers: int = 2, fusion: str = "early", fusion_layers: int = 2,
             fusion_tokens: int = 8, fused_weight: float = 0.5, dropout: float = 0.1, update_frequency: int = 20,
             controller_hidden: int = 32, lr_multiplier_min: float = 0.25, lr_multiplier_max: float = 4.0,
             controller_lr: float = 0.01, exploration: float = 0.1) -> DualLoopModel:
    problems = []
    if fusion not in FUSIONS:
        problems.append(f"fusion must be one of {', '.join(FUSIONS)} (got {fusion!r})")
    if model_dim % heads:
        problems.append(f"model_dim ({model_dim}) must be a multiple of heads ({heads})")
    for name, value in {"layers": layers, "fusion_layers": fusion_layers, "fusion_tokens": fusion_tokens,
                        "update_frequency": update_frequency, "controller_hidden": controller_hidden}.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{name} must be an integer ≥ 1 (got {value!r})")
    if not 0 <= dropout < 1:
        problems.append(f"dropout must be in [0, 1) (got {dropout})")
    if fused_weight < 0:
        problems.append(f"fused_weight must be ≥ 0 (got {fused_weight})")
    if not 0 < lr_multiplier_min <= lr_multiplier_max:
        problems.append("need 0 < lr_multiplier_min ≤ lr_multiplier_max "
                        f"(got {lr_multiplier_min}, {lr_multiplier_max})")
    if controller_lr <= 0 or exploration <= 0:
        problems.append(f"controller_lr and exploration must be positive (got {controller_lr}, {exploration})")
    if problems:
        raise ConfigError("; ".join(problems))
    return DualLoopModel(
        image_dim=image_dim, image_tokens=image_tokens, image_token_dim=image_token_dim, vocab_size=vocab_size,
        context_length=context_length, n_mels=n_mels, model_dim=model_dim, latent_dim=latent_dim, heads=heads,
        layers=layers, fusion=fusion, fusion_layers=fusion_layers, fusion_tokens=fusion_tokens,
        fused_weight=fused_weight, dropout=dropout, update_frequency=update_frequency,
        controller_hidden=controller_hidden, lr_multiplier_min=lr_multiplier_min, lr_multiplier_max=lr_multiplier_max,
        controller_lr=controller_lr, exploration=exploration)
