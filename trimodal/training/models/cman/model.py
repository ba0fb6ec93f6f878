"""`cman` — cross-modal attention network: pretrained frozen towers with LoRA, a fusion transformer, and a
max-margin loss.

Towers. `mm featurize` ran each pretrained tower up to block L once and stored the states there (partial
caching, `:layer=L`); this model runs the tower's remaining `adapt_blocks` blocks and its head from those
states, frozen, with LoRA (peft) on their attention projections. `adapt_blocks = 0` reads the towers'
cached outputs only (pooled image and caption embeddings; speech frames, averaged). A modality whose
store holds no tower output (log-mels, plain token ids) gets a small trainable encoder instead, as the
other families have.

Fusion. Each modality becomes tokens in `fusion_dim`: a summary token (its pooled tower output) then,
with `fusion_tokens`, its per-position states, plus a learned modality-type embedding. One fusion
transformer runs over the tokens of any non-empty subset of modalities: alone, a modality's latent is
its summary token's output (so images, captions and utterances are indexed separately for retrieval);
together, a learned fusion token gathers them (`encode_subset`). Latents are projected to `latent_dim`.

Loss: `max_margin` (VSE++, hardest negative, margin 0.2, both directions, every pair of modalities
present; `max_violation = false` sums over all negatives) or `infonce`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trimodal.errors import ConfigError
from trimodal.training.losses import clip_loss, max_margin_loss, multimodal_pairs
from trimodal.training.models import register_model
from trimodal.training.models.encoders import AudioEncoder, TextEncoder, masked_mean, sinusoidal_positions, transformer
from trimodal.training.models.cman.lora import add_lora, tower_top
from trimodal.training.models.family import MODALITIES, Family, present_modalities

LOSSES = ("max_margin", "infonce")


class TowerInput(nn.Module):
    """One modality's fusion tokens (B, T, fusion_dim) and mask (B, T): summary token first."""

    def __init__(self, modality: str, *, dim: int, fusion_dim: int, sequence: bool, top: nn.Module | None = None,
                 encoder: nn.Module | None = None, token_width: int | None = None):
        super().__init__()
        self.modality, self.sequence = modality, sequence
        self.top, self.encoder = top, encoder  # a frozen tower top (LoRA inside), or a trainable encoder
        self.summary = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, fusion_dim))
        if sequence:
            self.tokens = nn.Sequential(nn.LayerNorm(token_width), nn.Linear(token_width, fusion_dim))

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, states, mask = self._tower(batch)
        summary = self.summary(pooled.float()).unsqueeze(1)
        ones = torch.ones(len(summary), 1, dtype=torch.bool, device=summary.device)
        if not self.sequence or states is None:
            return summary, ones
        states = self.tokens(states.float())
        states = states + sinusoidal_positions(states.shape[1], states.shape[2], states.device)
        return torch.cat([summary, states], 1), torch.cat([ones, mask], 1)

    def _tower(self, batch: dict):
        """(pooled (B, D), states (B, T, W) or None, mask (B, T) or None)."""
        modality = self.modality
        if self.encoder is not None:  # the small trainable encoders: pooled only
            if modality == "text":
                return self.encoder(batch["text"]), None, None
            return self.encoder(batch["audio"], batch["audio_mask"]), None, None
        if modality == "image":
            if self.top is None:
                return batch["image"], None, None
            states = self.top.run_blocks(batch["image_tokens"], None)
            return self.top.head(states, None), states, torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
        if modality == "text":
            if self.top is None:
                return batch["text_embedding"], None, None
            ids = batch["text"]
            states = self.top.run_blocks(batch["text_states"], ids)
            mask = torch.arange(states.shape[1], device=ids.device)[None, :] <= ids.argmax(dim=1)[:, None]
            return self.top.head(states, ids), states, mask
        frames, mask = batch["audio"], batch["audio_mask"]
        if self.top is None:  # cached frames: their mean is the summary
            return masked_mean(frames, mask), frames, mask
        states = self.top.run_blocks(frames, mask)
        return self.top.head(states, mask), states, mask


class CrossModalAttentionNetwork(Family):
    """Under torchrun the frozen tower weights are the same on every rank by construction (the weights file,
    or the fixed-seed random init) and hold no gradient; DDP all-reduces the gradients of the LoRA adapters,
    the input projections and the fusion transformer only. The max-margin loss takes its hardest negatives
    from the global batch (the trainer gathers the latents)."""

    def __init__(self, inputs: dict[str, TowerInput], *, fusion_dim: int, fusion_heads: int, fusion_layers: int,
                 latent_dim: int, dropout: float, loss: str, margin: float, max_violation: bool, fused_weight: float,
                 store_inputs: dict):
        super().__init__()
        self.inputs = nn.ModuleDict(inputs)
        self.modalities = tuple(m for m in MODALITIES if m in inputs)  # the config's `modalities`
        self.type_embedding = nn.Embedding(len(MODALITIES) + 1, fusion_dim)  # the last one: the fusion token
        self.fusion = transformer(fusion_dim, fusion_heads, fusion_layers, dropout)
        self.norm = nn.LayerNorm(fusion_dim)
        self.projections = nn.ModuleDict({m: nn.Linear(fusion_dim, latent_dim) for m in inputs})
        self.fused_projection = nn.Linear(fusion_dim, latent_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.loss, self.margin, self.max_violation, self.fused_weight = loss, margin, max_violation, fused_weight
        self._store_inputs = store_inputs

    def store_inputs(self) -> dict:
        """What the model reads from the feature store (see `trimodal.training.data.DEFAULT_INPUTS`)."""
        return dict(self._store_inputs)

    def _tokens(self, modality: str, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if modality not in self.inputs:
            raise ConfigError(f"this cman model has no {modality} input (it was built for {', '.join(self.inputs)})")
        tokens, mask = self.inputs[modality](batch)
        return tokens + self.type_embedding.weight[MODALITIES.index(modality)], mask

    def cross_modal_attention(self) -> list[str]:
        """The fusion layer's attention: it attends over the tokens of every modality present."""
        return [name for name, module in self.named_modules()
                if name.startswith("fusion.") and isinstance(module, nn.MultiheadAttention)]

    def encode(self, modality: str, batch: dict) -> torch.Tensor:
        """Unit-length latents (B, latent_dim) of one modality on its own: its summary token's output."""
        tokens, mask = self._tokens(modality, batch)
        hidden = self.fusion(tokens, src_key_padding_mask=~mask)
        return F.normalize(self.projections[modality](self.norm(hidden[:, 0])).float(), dim=-1)

    def encode_subset(self, batch: dict, modalities: list[str]) -> torch.Tensor:
        """Unit-length latents of several modalities attended together, read from a learned fusion token."""
        if not modalities:
            raise ConfigError("encode_subset needs at least one modality")
        parts = [self._tokens(m, batch) for m in modalities]
        batch_size = len(parts[0][0])
        fusion = self.type_embedding.weight[-1].expand(batch_size, 1, -1)
        tokens = torch.cat([fusion] + [t for t, _ in parts], 1)
        mask = torch.cat([torch.ones(batch_size, 1, dtype=torch.bool, device=tokens.device)] + [m for _, m in parts], 1)
        hidden = self.fusion(tokens, src_key_padding_mask=~mask)
        return F.normalize(self.fused_projection(self.norm(hidden[:, 0])).float(), dim=-1)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        present = present_modalities(self, batch)
        latents = {m: self.encode(m, batch) for m in present}
        if self.training and self.fused_weight > 0 and len(present) == 3:
            # Leave one out: the other two modalities fused, matched against the third.
            for held_out in present:
                latents[f"fused:{held_out}"] = self.encode_subset(batch, [m for m in present if m != held_out])
        return latents

    def training_loss(self, latents: dict, present: dict, weights: dict | None = None):
        """The pair loss over every pair of single modalities present, plus `fused_weight` × the mean of the
        leave-one-out terms (two modalities fused against the third) when they were computed."""
        single = {m: v for m, v in latents.items() if not m.startswith("fused:")}
        total, losses = multimodal_pairs(single, present, self.pair_loss, weights)
        fused = {name.split(":", 1)[1]: v for name, v in latents.items() if name.startswith("fused:")}
        if fused:
            rows = torch.stack([present[m] for m in single]).all(0)
            if int(rows.sum()) >= 2:
                for held_out, vectors in fused.items():
                    losses[f"fused-{held_out}"] = self.pair_loss(vectors[rows], single[held_out][rows])
                total = total + self.fused_weight * sum(losses[f"fused-{m}"] for m in fused) / len(fused)
        return total, losses

    def pair_loss(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        if self.loss == "infonce":
            return clip_loss(first, second, self.logit_scale)
        return max_margin_loss(first, second, self.margin, self.max_violation)


def _tower_input(modality: str, spec: str, adapt_blocks: int, lora: dict, *, fusion_dim: int, sequence: bool,
                 pooled_dim: int, frame_width: int, fallback) -> tuple[TowerInput, str]:
    """A modality's input module and what it reads from the store."""
    if not spec and adapt_blocks > 0 and modality != "audio":
        flag = "--image open_clip:<model>[:<weights>]:layer=L --image-tokens" if modality == "image" else \
            "--text open_clip:<model>[:<weights>]:layer=L --text-tokens"
        raise ConfigError(f"cman with adapt_blocks = {adapt_blocks} runs the last blocks of the {modality} tower from "
                          f"states cached in the feature store, but the store has no {modality} tower states; featurize "
                          f"with {flag} (L = the tower's depth - adapt_blocks; the config's `# featurize:` line names "
                          "them) or set adapt_blocks = 0")
    if not spec:  # no tower in the store: a small trainable encoder (or, for images, the stored embedding)
        if modality == "image":
            return TowerInput(modality, dim=pooled_dim, fusion_dim=fusion_dim, sequence=False), "embedding"
        encoder, dim = fallback()
        return TowerInput(modality, dim=dim, fusion_dim=fusion_dim, sequence=False, encoder=encoder), "ids"
    if adapt_blocks == 0:
        kind = {"image": "embedding", "text": "embedding", "audio": "frames"}[modality]
        return TowerInput(modality, dim=pooled_dim, fusion_dim=fusion_dim, sequence=sequence and modality == "audio",
                          token_width=frame_width), kind
    top = tower_top(modality, spec, adapt_blocks)
    add_lora(top, modality, **lora)
    kind = {"image": "tokens", "text": "states", "audio": "frames"}[modality]
    return TowerInput(modality, dim=pooled_dim, fusion_dim=fusion_dim, sequence=sequence, top=top,
                      token_width=frame_width if modality == "audio" else _state_width(top)), kind


def _state_width(top) -> int:
    """The width of an image or text tower's states."""
    norm = getattr(top, "ln_post", None) or getattr(top, "norm", None) or top.ln_final
    return int(norm.normalized_shape[0])


@register_model("cman")
def cman(*, image_dim: int = 512, vocab_size: int = 49408, context_length: int = 77, n_mels: int = 80,
         image_tower: str = "", text_tower: str = "", text_dim: int = 512, audio_tower: str = "",
         adapt_blocks: int = 2, rank: int = 8, alpha: float = 16.0, lora_dropout: float = 0.0,
         target_modules: list = [], fusion_dim: int = 512, fusion_heads: int = 8,  # noqa: B006 (never mutated)
         fusion_layers: int = 6, fusion_tokens: bool = True, latent_dim: int = 512, encoder_dim: int = 256,
         encoder_layers: int = 2, dropout: float = 0.1, loss: str = "max_margin", margin: float = 0.2,
         max_violation: bool = True, fused_weight: float = 0.0,
         modalities: list = ["image", "text", "audio"]) -> CrossModalAttentionNetwork:  # noqa: B006
    """`image_tower`, `text_tower`, `audio_tower`, `image_dim`, `text_dim` and `n_mels` (the audio frame
    width) come from the feature store; the rest from the config."""
    problems = []
    if loss not in LOSSES:
        problems.append(f"loss must be one of {', '.join(LOSSES)} (got {loss!r})")
    if fusion_dim % fusion_heads:
        problems.append(f"fusion_dim ({fusion_dim}) must be a multiple of fusion_heads ({fusion_heads})")
    if adapt_blocks < 0 or rank < 1 or fusion_layers < 1:
        problems.append("adapt_blocks must be at least 0, rank and fusion_layers at least 1")
    if encoder_dim % 4:
        problems.append(f"encoder_dim ({encoder_dim}) must be a multiple of 4 (its heads)")
    unknown = sorted(set(modalities) - set(MODALITIES))
    if unknown or not modalities:
        problems.append(f"modalities must be a non-empty subset of {', '.join(MODALITIES)}")
    if problems:
        raise ConfigError("cman: " + "; ".join(problems))
    lora = {"rank": rank, "alpha": alpha, "dropout": lora_dropout, "target_modules": list(target_modules)}
    common = {"fusion_dim": fusion_dim, "sequence": fusion_tokens}
    builders = {
        "image": lambda: _tower_input("image", image_tower, adapt_blocks, lora, pooled_dim=image_dim, frame_width=0,
                                      fallback=None, **common),
        "text": lambda: _tower_input("text", text_tower, adapt_blocks, lora, pooled_dim=text_dim, frame_width=0,
                                     fallback=lambda: (TextEncoder(vocab_size, context_length, encoder_dim, 4,
                                                                   encoder_layers, dropout), encoder_dim), **common),
        "audio": lambda: _tower_input("audio", audio_tower, adapt_blocks, lora, pooled_dim=n_mels, frame_width=n_mels,
                                      fallback=lambda: (AudioEncoder(n_mels, encoder_dim, 4, encoder_layers, dropout),
                                                        encoder_dim), **common),
    }
    inputs, kinds = {}, {}
    for modality in MODALITIES:
        if modality in modalities:
            inputs[modality], kinds[modality] = builders[modality]()
    store_inputs = {"image": kinds.get("image", "embedding"), "text": kinds.get("text", "ids")}
    return CrossModalAttentionNetwork(inputs, fusion_dim=fusion_dim, fusion_heads=fusion_heads,
                                      fusion_layers=fusion_layers, latent_dim=latent_dim, dropout=dropout, loss=loss,
                                      margin=margin, max_violation=max_violation, fused_weight=fused_weight,
                                      store_inputs=store_inputs)
