"""`mmn` — Multimodal Memory Network.

Each present modality is encoded on its own (so images, captions and utterances can be indexed
separately for retrieval), tagged with a learned modality-type embedding, enriched by a read from its
own memory bank, then refined for `feedback_steps` rounds against a central memory shared by all
modalities, and projected into the shared latent space. Memory reads are real multi-head attention
(`nn.MultiheadAttention`) from the modality state into the slots.

Test-time training: when switched on, every encoding in eval mode also moves the top-k memory slots
of each query toward it (vectorised, under `no_grad`, memory parameters only). `reset_memory()`
restores the trained memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trimodal.training.models import register_model
from trimodal.training.models.encoders import AudioEncoder, ImageEncoder, TextEncoder, run_encoder
from trimodal.training.models.family import MODALITIES, Family, present_modalities


class MemoryBank(nn.Module):
    """Learned slots read by multi-head attention; optionally written at test time."""

    def __init__(self, slots: int, dim: int, heads: int, dropout: float):
        super().__init__()
        self.slots = nn.Parameter(torch.randn(slots, dim) / math.sqrt(dim))
        self.norm = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        memory = self.slots.unsqueeze(0).expand(state.shape[0], -1, -1).to(state.dtype)
        read, _ = self.attention(self.norm(state).unsqueeze(1), memory, memory, need_weights=False)
        return read.squeeze(1)

    @torch.no_grad()
    def test_time_update(self, state: torch.Tensor, k: int, step: float) -> torch.Tensor:
        """Move each query's k most similar slots toward it; returns the indices of the slots moved."""
        state = state.detach().float()
        scores = F.normalize(state, dim=-1) @ F.normalize(self.slots.float(), dim=-1).T  # (B, S)
        top_scores, top_slots = scores.topk(min(k, self.slots.shape[0]), dim=1)
        weights = top_scores.softmax(dim=1).flatten()  # each query spreads one unit over its k slots
        chosen = top_slots.flatten()
        pulled = torch.zeros_like(self.slots, dtype=torch.float32)
        pulled.index_add_(0, chosen, weights.unsqueeze(1) * state.repeat_interleave(top_slots.shape[1], dim=0))
        mass = torch.zeros(self.slots.shape[0], device=state.device).index_add_(0, chosen, weights)
        touched = mass > 0
        target = pulled[touched] / mass[touched].unsqueeze(1)
        self.slots.data[touched] += step * (target - self.slots.data[touched].float()).to(self.slots.dtype)
        return touched.nonzero().flatten()


class MultimodalMemoryNetwork(Family):
    has_test_time_training = True
    ttt_options = ("k", "step")

    def __init__(self, *, image_dim: int, image_tokens: bool, image_token_dim: int, vocab_size: int,
                 context_length: int, n_mels: int, model_dim: int, latent_dim: int, heads: int, layers: int,
                 image_layers: int, memory_slots: int, central_slots: int, feedback_steps: int, dropout: float,
                 ttt_k: int, ttt_step: float):
        super().__init__()
        self.feedback_steps, self.ttt_k, self.ttt_step = feedback_steps, ttt_k, ttt_step
        self.image_tokens = image_tokens
        self.encoders = nn.ModuleDict({
            "image": ImageEncoder(image_token_dim if image_tokens else image_dim, model_dim, tokens=image_tokens,
                                  heads=heads, layers=image_layers, dropout=dropout),
            "text": TextEncoder(vocab_size, context_length, model_dim, heads, layers, dropout),
            "audio": AudioEncoder(n_mels, model_dim, heads, layers, dropout),
        })
        self.type_embedding = nn.Embedding(len(MODALITIES), model_dim)
        self.memories = nn.ModuleDict({m: MemoryBank(memory_slots, model_dim, heads, dropout) for m in MODALITIES})
        self.central = MemoryBank(central_slots, model_dim, heads, dropout)
        self.feedback = nn.Sequential(nn.Linear(2 * model_dim, model_dim), nn.GELU(), nn.Linear(model_dim, model_dim))
        self.feedback_norm = nn.LayerNorm(model_dim)
        self.projections = nn.ModuleDict({m: nn.Linear(model_dim, latent_dim) for m in MODALITIES})
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.test_time_training = False
        self._trained_memory: dict[str, torch.Tensor] | None = None

    # -- encoding ---------------------------------------------------------------------------------

    def encode(self, modality: str, batch: dict) -> torch.Tensor:
        """Unit-length latents (B, latent_dim) for one modality of `batch`."""
        state = run_encoder(self.encoders, modality, batch, self.image_tokens)
        state = state + self.type_embedding.weight[MODALITIES.index(modality)]
        adapting = self.test_time_training and not self.training
        if adapting:
            self.memories[modality].test_time_update(state, self.ttt_k, self.ttt_step)
        state = state + self.memories[modality](state)
        for _ in range(self.feedback_steps):
            if adapting:
                self.central.test_time_update(state, self.ttt_k, self.ttt_step)
            context = self.central(state)
            state = self.feedback_norm(state + self.feedback(torch.cat([state, context], dim=-1)))
        return F.normalize(self.projections[modality](state).float(), dim=-1)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return {modality: self.encode(modality, batch) for modality in present_modalities(self, batch)}

    # -- test-time training -----------------------------------------------------------------------

    def memory_parameters(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.named_parameters() if name.endswith(".slots")}

    def start_test_time_training(self, k: int | None = None, step: float | None = None) -> None:
        """Switch memory writes on for eval-mode encodings, remembering the trained memory."""
        self.ttt_k = k or self.ttt_k
        self.ttt_step = step if step is not None else self.ttt_step
        if self._trained_memory is None:
            self._trained_memory = {n: p.detach().clone() for n, p in self.memory_parameters().items()}
        self.test_time_training = True

    def ttt_settings(self) -> dict:
        return {"k": self.ttt_k, "step": self.ttt_step}

    def check_ttt_options(self, options: dict) -> list[str]:
        k, step = options.get("k"), options.get("step")
        if (k is not None and k < 1) or (step is not None and not 0 < step <= 1):
            return ["--ttt-k must be at least 1 and --ttt-step in (0, 1]"]
        return []

    def adapted_latents(self, embed, options: dict) -> dict[str, torch.Tensor]:
        """One pass over the split's inputs writes the memory (top-k slots per query, `options` k and step),
        then the split is embedded with the adapted memory, then the trained memory is restored. The
        writing pass runs every batch on every rank: each write depends on the ones before it."""
        self.start_test_time_training(options.get("k"), options.get("step"))
        try:
            embed(self.encode, every_batch=True)  # the adaptation pass
            self.test_time_training = False
            return embed(self.encode)
        finally:
            self.reset_memory()

    @torch.no_grad()
    def reset_memory(self) -> None:
        """Restore the memory to its trained state and switch test-time writes off."""
        if self._trained_memory is not None:
            for name, parameter in self.memory_parameters().items():
                parameter.copy_(self._trained_memory[name])
        self._trained_memory = None
        self.test_time_training = False


@register_model("mmn")
def mmn(*, image_dim: int = 512, image_tokens: bool = False, image_token_dim: int = 768, vocab_size: int = 49408,
        context_length: int = 77, n_mels: int = 80, model_dim: int = 256, latent_dim: int = 256, heads: int = 4,
        layers: int = 3, image_layers: int = 1, memory_slots: int = 64, central_slots: int = 64,
        feedback_steps: int = 2, dropout: float = 0.1, ttt_k: int = 4, ttt_step: float = 0.1) -> MultimodalMemoryNetwork:
    if model_dim % heads:
        from trimodal.errors import ConfigError

        raise ConfigError(f"model_dim ({model_dim}) must be a multiple of heads ({heads})")
    return MultimodalMemoryNetwork(
        image_dim=image_dim, image_tokens=image_tokens, image_token_dim=image_token_dim, vocab_size=vocab_size,
        context_length=context_length, n_mels=n_mels, model_dim=model_dim, latent_dim=latent_dim, heads=heads,
        layers=layers, image_layers=image_layers, memory_slots=memory_slots, central_slots=central_slots,
        feedback_steps=feedback_steps, dropout=dropout, ttt_k=ttt_k, ttt_step=ttt_step)
