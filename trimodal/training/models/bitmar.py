"""`bitmar` — BabyLM's multimodal family: a BitNet b1.58 text encoder and caption decoder, cached image
vectors (BabyLM's DINOv2, or any `mm featurize --image` tower), a fusion into episode codes, Larimar's
least-squares episodic memory, and caption generation (`generate`, greedy or beam search).

    image vector ─ BitLinear projection ─ v ──────────────┐            ┌─ image latent (retrieval)
    caption ids ─ BitNet encoder ─ pooled t ─ fusion(v, t) ─ episode z ─ Larimar write M = W†Z
                                                                        read ẑ = (z·M†)·M ─┐
    decoder (causal BitNet): [v, recall(ẑ)] prefix, then the caption's tokens ───────────────┘

Every linear layer of the text encoder, fusion, decoder and the vision projection is a `BitLinear`
(ternary weights, 8-bit activations). Full precision: the token embedding (tied to the output head),
the learned prefixes, the Larimar prior M₀, norms and the temperature.

Losses, chosen per training stage (`[[train.stages]]` `losses`):
- "lm": the decoder as a text-only language model (both prefix tokens learned constants);
- "contrastive": symmetric InfoNCE between image and caption latents (retrieval image<->text);
- "caption": the caption's cross-entropy given the image. In a stage that also trains "memory", the
  second prefix token is what the memory recalls: written with the batch's image-only episodes and read
  with each image's, which is the only memory test time has (captions are unknown there);
- "memory": Larimar's objective — the batch's fused text+vision episodes are written, each is read back
  and the decoder reconstructs its caption from that read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from trimodal.features.towers import caption_extent, masked_mean
from trimodal.training.generation import beam_search
from trimodal.training.losses import multimodal_infonce
from trimodal.training.models import register_model
from trimodal.training.models.bitnet import BitLinear, BitTransformer, quantisation_report
from trimodal.training.models.larimar import EpisodicMemory
from trimodal.training.models.mmn import EmptyInputError

LOSSES = ("lm", "contrastive", "caption", "memory")


class BitMar(nn.Module):
    modalities = ("image", "text")
    loss_names = LOSSES
    default_losses = ("contrastive", "caption", "memory")

    def __init__(self, *, image_dim: int, vocab_size: int, dim: int, heads: int, encoder_layers: int,
                 decoder_layers: int, fusion_layers: int, mlp_ratio: float, latent_dim: int, memory_size: int,
                 episode_dim: int, pinv_steps: int, write_noise: float, dropout: float, max_caption_tokens: int):
        super().__init__()
        self.max_caption_tokens = max_caption_tokens
        self.token_embedding = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.text_encoder = BitTransformer(dim, heads, encoder_layers, mlp_ratio=mlp_ratio, dropout=dropout)
        self.text_latent = BitLinear(dim, latent_dim)
        self.vision = nn.Sequential(BitLinear(image_dim, dim), nn.SiLU(), BitLinear(dim, dim))
        self.image_latent = BitLinear(dim, latent_dim)
        self.absent_text = nn.Parameter(torch.zeros(dim))
        self.fusion = BitTransformer(dim, heads, fusion_layers, mlp_ratio=mlp_ratio, dropout=dropout)
        self.episode = BitLinear(dim, episode_dim)
        self.memory = EpisodicMemory(memory_size, episode_dim, pinv_steps, write_noise)
        self.recall = BitLinear(episode_dim, dim)
        self.null_prefix = nn.Parameter(0.02 * torch.randn(2, dim))
        self.decoder = BitTransformer(dim, heads, decoder_layers, mlp_ratio=mlp_ratio, dropout=dropout, causal=True)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # Set once a stage trained the memory: captions are then generated with its recall.
        self.register_buffer("memory_trained", torch.tensor(False))
        self.losses: tuple[str, ...] = self.default_losses

    # -- stages --------------------------------------------------------------------------------------

    def set_stage(self, losses: Sequence[str]) -> None:
        self.losses = tuple(losses)
        if "memory" in self.losses:
            self.memory_trained.fill_(True)

    def quantisation(self) -> dict:
        """`quantisation_report`: -1/0/+1 shares per BitLinear, packed vs fp16 size."""
        return quantisation_report(self)

    # -- encoders ------------------------------------------------------------------------------------

    def _text(self, ids: torch.Tensor) -> torch.Tensor:
        """Pooled encoder states of ids already cut at the batch's extent (`caption_extent`)."""
        mask = ids != 0
        return masked_mean(self.text_encoder(self.token_embedding(ids), mask), mask)

    def encode(self, modality: str, batch: dict) -> torch.Tensor:
        if modality == "image":
            return F.normalize(self.image_latent(self.vision(batch["image"])), dim=-1)
        if modality == "text":
            ids = batch["text"]
            return F.normalize(self.text_latent(self._text(ids[:, : caption_extent(ids)])), dim=-1)
        raise ValueError(f"bitmar encodes image and text, not {modality}")

    def episodes(self, vision: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
        """(B, episode_dim) codes of the fused image and caption (the caption absent when None)."""
        text = self.absent_text.expand_as(vision) if text is None else text
        return self.episode(self.fusion(torch.stack([vision, text], dim=1)).mean(dim=1))

    def recalled(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the episode `codes` and read each one back: (prefix tokens (B, dim), slot weights (B, K))."""
        memory = self.memory.write(codes)
        read, weights = self.memory.read(memory, codes)
        return self.recall(read.to(codes.dtype)), weights

    # -- training ------------------------------------------------------------------------------------

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        present = [m for m in self.modalities if m in batch]
        if not present:
            raise EmptyInputError("empty input: a batch needs at least one of image, text (bitmar reads no audio)")
        latents, vision, text, ids = {}, None, None, None
        if "image" in batch:
            vision = self.vision(batch["image"])
            latents["image"] = F.normalize(self.image_latent(vision), dim=-1)
        if "text" in batch:
            ids = batch["text"][:, : caption_extent(batch["text"])]  # nothing past the last end-of-text is read
            text = self._text(ids)
            latents["text"] = F.normalize(self.text_latent(text), dim=-1)
        if self.training and ids is not None:
            latents.update(self._generative_losses(batch, ids, vision, text))
        return latents

    def _generative_losses(self, batch: dict, ids: torch.Tensor, vision, text) -> dict[str, torch.Tensor]:
        rows = batch.get("text_present", torch.ones(len(ids), dtype=torch.bool, device=ids.device))
        losses = {}
        if "lm" in self.losses:
            losses["lm"] = self.caption_loss(self.null_prefix.expand(int(rows.sum()), -1, -1), ids[rows])
        if vision is None:
            return losses
        rows = rows & batch.get("image_present", rows)
        if int(rows.sum()) < 2:
            return losses
        ids, vision, text = ids[rows], vision[rows], text[rows]
        if "caption" in self.losses:
            if "memory" in self.losses:
                second, _ = self.recalled(self.episodes(vision, None))
            else:
                second = self.null_prefix[1].expand_as(vision)
            losses["caption"] = self.caption_loss(torch.stack([vision, second], dim=1), ids)
        if "memory" in self.losses:
            second, _ = self.recalled(self.episodes(vision, text))
            losses["memory"] = self.caption_loss(torch.stack([vision, second], dim=1), ids)
        return losses

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.token_embedding.weight.T  # the output head is the tied embedding

    def caption_loss(self, prefix: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each next caption token (after start-of-text) given `prefix` (B, P, dim)."""
        inputs, targets = ids[:, :-1], ids[:, 1:]
        hidden = self.decoder(torch.cat([prefix, self.token_embedding(inputs)], dim=1))[:, prefix.shape[1] :]
        real = targets != 0  # padding is never predicted (nor computed)
        return F.cross_entropy(self.logits(hidden[real]).float(), targets[real])

    def training_loss(self, latents: dict[str, torch.Tensor], present: dict[str, torch.Tensor],
                      weights: dict[str, float] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted sum of this stage's losses (`weights` by loss name, 1 when absent)."""
        weights = weights or {}
        losses = {name: latents[name] for name in ("lm", "caption", "memory") if name in latents}
        if "contrastive" in self.losses and "image" in latents and "text" in latents:
            losses["contrastive"], _ = multimodal_infonce({m: latents[m] for m in self.modalities}, present,
                                                          self.logit_scale)
        if not losses:
            raise ValueError(f"no loss of this stage ({', '.join(self.losses)}) applies to the batch")
        return sum(weights.get(name, 1.0) * loss for name, loss in losses.items()), losses

    # -- generation ----------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, images: torch.Tensor, *, start: int, end: int, beams: int = 1, episode_size: int = 32,
                 max_tokens: int | None = None) -> tuple[list[list[int]], torch.Tensor]:
        """Caption token ids for (N, image_dim) image vectors (without start/end tokens), and the memory
        slot weights of each read (N, K; zeros when no stage trained the memory). The images are written
        to memory in consecutive episodes of `episode_size`, as training writes its batches."""
        vision = self.vision(images)
        weights = torch.zeros(len(images), self.memory.slots, device=images.device)
        if bool(self.memory_trained):
            seconds = []
            for first in range(0, len(images), episode_size):
                chunk = vision[first : first + episode_size]
                second, weights[first : first + episode_size] = self.recalled(self.episodes(chunk, None))
                seconds.append(second)
            second = torch.cat(seconds)
        else:
            second = self.null_prefix[1].expand_as(vision)
        prefix = torch.stack([vision, second], dim=1)

        def next_log_probs(rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            hidden = self.decoder(torch.cat([prefix[rows], self.token_embedding(ids)], dim=1))[:, -1]
            logits = self.logits(hidden).float()
            logits[:, [0, start]] = -torch.inf  # a caption holds neither padding nor start-of-text
            return F.log_softmax(logits, dim=-1)

        tokens = beam_search(next_log_probs, len(images), start=start, end=end, beams=beams,
                             max_tokens=max_tokens or self.max_caption_tokens, device=images.device)
        return tokens, weights


@register_model("bitmar")
def bitmar(*, image_dim: int = 768, vocab_size: int = 49408, dim: int = 128, heads: int = 4,
           encoder_layers: int = 2, decoder_layers: int = 2, fusion_layers: int = 1, mlp_ratio: float = 2.0,
           latent_dim: int = 128, memory_size: int = 512, episode_dim: int = 128, pinv_steps: int = 15,
           write_noise: float = 1e-6, dropout: float = 0.1, max_caption_tokens: int = 32) -> BitMar:
    """`pinv_steps` 0 takes exact (SVD) pseudo-inverses instead of Ben-Israel–Cohen iterations. Captions
    are read up to their end-of-text token, so the store's context length is no setting."""
    from trimodal.errors import ConfigError

    problems = [f"{name} must be at least 1" for name, value in
                (("dim", dim), ("heads", heads), ("latent_dim", latent_dim), ("memory_size", memory_size),
                 ("episode_dim", episode_dim), ("max_caption_tokens", max_caption_tokens),
                 ("encoder_layers", encoder_layers), ("decoder_layers", decoder_layers),
                 ("fusion_layers", fusion_layers)) if value < 1]
    if dim % heads:
        problems.append(f"dim {dim} must be divisible by heads {heads}")
    if pinv_steps < 0:
        problems.append("pinv_steps must be 0 (exact) or more")
    if problems:
        raise ConfigError("bitmar: " + "; ".join(problems))
    return BitMar(image_dim=image_dim, vocab_size=vocab_size, dim=dim, heads=heads, encoder_layers=encoder_layers,
                  decoder_layers=decoder_layers, fusion_layers=fusion_layers, mlp_ratio=mlp_ratio,
                  latent_dim=latent_dim, memory_size=memory_size, episode_dim=episode_dim, pinv_steps=pinv_steps,
                  write_noise=write_noise, dropout=dropout, max_caption_tokens=max_caption_tokens)
