"""`nlmm` — Nested-Learning multimodal model.

Per-modality encoders over the cached features (the front-ends `mmn` uses) whose transformer blocks
carry a Continuum Memory System in place of the single MLP (`cms.py`); each CMS level is stepped by its
own optimizer on its own period (`continuum.py`). A modality's latent is its projection plus a
low-rank adapter, unit length, in the shared space.

Test-time training (`mm eval --ttt`): for every query batch, `ttt_max_steps` gradient steps of rate
`ttt_eta` on the adapters of that batch's modality, then the batch is encoded, then the adapters are
restored. The self-supervised loss is InfoNCE between two corrupted views of the batch's own inputs
(15% of tokens or frames dropped, or 10% noise on image features): it needs no pairing between
modalities, so no test label (which caption belongs to which image) leaks into the queries, and it
pulls each query's latent toward what is stable in it under corruption. The adapters are trained with
the rest of the model, so test-time steps start from a learned initialisation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trimodal.errors import ConfigError
from trimodal.training.models.nlmm.continuum import ContinuumOptimization, check_levels
from trimodal.training.losses import clip_loss
from trimodal.training.models import register_model
from trimodal.training.models.nlmm.cms import CMSTransformer, level_parameters
from trimodal.training.models.encoders import AudioEncoder, ImageEncoder, TextEncoder, run_encoder
from trimodal.training.models.family import MODALITIES, Family, present_modalities

DEFAULT_LEVELS = [{"name": "fast", "chunk_size": 1, "lr": 2e-4, "optimizer": "dmgd"},
                  {"name": "mid", "chunk_size": 4, "lr": 2e-4, "optimizer": "m3"},
                  {"name": "slow", "chunk_size": 16, "lr": 1e-4, "optimizer": "adamw"}]
DROP = 0.15  # share of tokens / frames dropped in a test-time view
NOISE = 0.10  # relative noise on image features in a test-time view


class LowRankAdapter(nn.Module):
    """x -> B(A(x)), rank r, B zero-initialised (the adapter starts as a no-op)."""

    def __init__(self, dim: int, out: int, rank: int):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, out, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class NestedLearningModel(Family):
    has_test_time_training = True

    def __init__(self, *, image_dim: int, image_tokens: bool, image_token_dim: int, vocab_size: int,
                 context_length: int, n_mels: int, model_dim: int, latent_dim: int, heads: int, depth: dict,
                 shared_depth: int, mlp_ratio: int, cms_levels: list[dict], dropout: float, ttt_max_steps: int, ttt_eta: float, adapter_rank: int):
        super().__init__()
        self.cms_levels = cms_levels
        self.image_tokens = image_tokens
        self.ttt_max_steps, self.ttt_eta, self.adapter_rank = ttt_max_steps, ttt_eta, adapter_rank
        names = [level["name"] for level in cms_levels]

        def backbone(modality):
            return CMSTransformer(model_dim, heads, depth[modality], names, dropout, mlp_ratio)

        self.encoders = nn.ModuleDict({
            "image": ImageEncoder(image_token_dim if image_tokens else image_dim, model_dim, tokens=image_tokens,
                                  dropout=dropout, backbone=backbone("image")),
            "text": TextEncoder(vocab_size, context_length, model_dim, heads, 0, dropout, backbone=backbone("text")),
            "audio": AudioEncoder(n_mels, model_dim, heads, 0, dropout, backbone=backbone("audio")),
        })
        # Blocks shared by every modality (with a type embedding) before the projections: a common
        # memory through which, e.g., speech and images meet what captions learned.
        self.type_embedding = nn.Embedding(len(MODALITIES), model_dim)
        self.shared = CMSTransformer(model_dim, heads, shared_depth, names, dropout, mlp_ratio)
        self.shared_norm = nn.LayerNorm(model_dim)
        self.projections = nn.ModuleDict({m: nn.Linear(model_dim, latent_dim) for m in MODALITIES})
        self.adapters = nn.ModuleDict({m: LowRankAdapter(model_dim, latent_dim, adapter_rank) for m in MODALITIES})
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def state(self, modality: str, batch: dict) -> torch.Tensor:
        state = run_encoder(self.encoders, modality, batch, self.image_tokens)
        state = state + self.type_embedding.weight[MODALITIES.index(modality)]
        return self.shared_norm(self.shared(state.unsqueeze(1)).squeeze(1))

    def encode(self, modality: str, batch: dict) -> torch.Tensor:
        """Unit-length latents (B, latent_dim) for one modality of `batch`."""
        state = self.state(modality, batch)
        return F.normalize((self.projections[modality](state) + self.adapters[modality](state)).float(), dim=-1)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return {modality: self.encode(modality, batch) for modality in present_modalities(self, batch)}

    # -- the trainer's hooks --------------------------------------------------------------------

    def level_parameters(self) -> dict[str, list]:
        return level_parameters(self, [level["name"] for level in self.cms_levels])

    def make_optimization(self, train, total_steps: int) -> ContinuumOptimization:
        """Every CMS level stepped by its own optimizer on its own period. Under torchrun each rank
        accumulates the same all-reduced (global-batch) gradients and steps its levels at the same global
        steps, so the periods count global steps and the replicas stay identical."""
        return ContinuumOptimization(self, train, total_steps, self.cms_levels, self.level_parameters())

    def plots(self, records: list[dict], folder) -> list:
        from trimodal.training.plots import plot_series

        return plot_series(records, "levels", (("change_norm", "‖Δθ‖ of the last update"),
                                              ("updates", "updates so far")), folder / "optimization.png")

    # -- test-time training ---------------------------------------------------------------------

    def ttt_settings(self) -> dict:
        return {"max_steps": self.ttt_max_steps, "eta": self.ttt_eta, "adapter_rank": self.adapter_rank,
                "loss": "InfoNCE between two corrupted views of the query batch"}

    def adapted_latents(self, embed, options: dict) -> dict[str, torch.Tensor]:
        """Each query batch adapts the adapters on its own and restores them: batches are independent, so
        under torchrun each rank takes its share of them."""
        return embed(self.ttt_encode)

    def ttt_encode(self, modality: str, batch: dict) -> torch.Tensor:
        """Adapt this modality's adapter on the batch, encode the batch, restore the adapter."""
        adapter = list(self.adapters[modality].parameters())
        saved = [p.detach().clone() for p in adapter]
        first = next(iter(v for v in batch.values() if torch.is_tensor(v)))
        try:
            if len(first) >= 2:
                generator = torch.Generator(device=first.device).manual_seed(len(first))
                with torch.enable_grad():
                    for _ in range(self.ttt_max_steps):
                        loss = self.view_loss(modality, batch, generator)
                        grads = torch.autograd.grad(loss, adapter)
                        with torch.no_grad():
                            for parameter, grad in zip(adapter, grads):
                                parameter -= self.ttt_eta * grad
            with torch.no_grad():
                return self.encode(modality, batch)
        finally:
            with torch.no_grad():
                for parameter, value in zip(adapter, saved):
                    parameter.copy_(value)

    def view_loss(self, modality: str, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """InfoNCE between the latents of two corrupted views of the same batch."""
        first = self.encode(modality, corrupt(modality, batch, generator))
        second = self.encode(modality, corrupt(modality, batch, generator))
        return clip_loss(first, second, self.logit_scale.detach())


def corrupt(modality: str, batch: dict, generator: torch.Generator) -> dict:
    """A view of `batch`: 15% of non-padding tokens or valid frames dropped (never all of them), or
    image features with 10% relative Gaussian noise."""
    view = dict(batch)
    if modality == "text":
        ids = batch["text"]
        drop = (torch.rand(ids.shape, generator=generator, device=ids.device) < DROP) & (ids != 0)
        drop[:, 0] = False  # the start token stays: no caption becomes empty
        view["text"] = ids.masked_fill(drop, 0)
    elif modality == "audio":
        mask = batch["audio_mask"]
        keep = torch.rand(mask.shape, generator=generator, device=mask.device) >= DROP
        keep[:, 0] = True
        view["audio_mask"] = mask & keep
    else:
        key = "image_tokens" if "image_tokens" in batch else "image"
        features = batch[key]
        noise = torch.randn(features.shape, generator=generator, device=features.device, dtype=features.dtype)
        view[key] = features + NOISE * features.std() * noise
    return view


@register_model("nlmm")
def nlmm(*, image_dim: int = 512, image_tokens: bool = False, image_token_dim: int = 768, vocab_size: int = 49408,
         context_length: int = 77, n_mels: int = 80, model_dim: int = 256, latent_dim: int = 256, heads: int = 4,
         depth: dict = {"image": 1, "text": 3, "audio": 3}, shared_depth: int = 1, mlp_ratio: int = 4, cms_levels: list = DEFAULT_LEVELS,  # noqa: B006 (read only)
         dropout: float = 0.1, ttt_max_steps: int = 1, ttt_eta: float = 1e-3, adapter_rank: int = 8
         ) -> NestedLearningModel:
    problems = []
    if model_dim % heads:
        problems.append(f"model_dim ({model_dim}) must be a multiple of heads ({heads})")
    if set(depth) != set(MODALITIES) or any(not isinstance(v, int) or v < 1 for v in depth.values()):
        problems.append(f"depth must give image, text and audio a depth ≥ 1 (got {depth})")
    if shared_depth < 0 or mlp_ratio < 1:
        problems.append(f"shared_depth must be ≥ 0 and mlp_ratio ≥ 1 (got {shared_depth}, {mlp_ratio})")
    if ttt_max_steps < 0 or ttt_eta <= 0 or adapter_rank < 1:
        problems.append("ttt_max_steps must be ≥ 0, ttt_eta positive and adapter_rank ≥ 1")
    if problems:
        raise ConfigError("; ".join(problems))
    return NestedLearningModel(
        image_dim=image_dim, image_tokens=image_tokens, image_token_dim=image_token_dim, vocab_size=vocab_size,
        context_length=context_length, n_mels=n_mels, model_dim=model_dim, latent_dim=latent_dim, heads=heads,
        depth=dict(depth), shared_depth=shared_depth, mlp_ratio=mlp_ratio, cms_levels=check_levels(cms_levels), dropout=dropout, ttt_max_steps=ttt_max_steps,
        ttt_eta=ttt_eta, adapter_rank=adapter_rank)
