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

The generative losses are token means over the whole batch: `forward` returns each row's summed
cross-entropy and its token count, and `training_loss` divides the sums by the counts.

Under torchrun an episode is the global batch, not a rank's share of it: the episode codes of every rank
are gathered (with gradients) before the memory is written, every rank writes the same memory and reads
its own rows from it. Why: the number of episodes a memory holds is part of the model (`mm eval` and
`mm caption` write episodes of `train.batch_size` images), so it must not change with the number of
GPUs, and N ranks then train exactly what one process with the whole batch would. The write noise is
drawn from a generator whose state is a buffer of the model, the same on every rank (DDP broadcasts
buffers) and saved with the weights, so a resumed run draws the same noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from trimodal import distributed
from trimodal.features.towers import caption_extent, masked_mean
from trimodal.training.losses import multimodal_infonce
from trimodal.training.models import register_model
from trimodal.training.models.bitmar.bitnet import BitLinear, BitTransformer, quantisation_report
from trimodal.training.models.bitmar.generation import beam_search
from trimodal.training.models.bitmar.larimar import EpisodicMemory
from trimodal.training.models.family import EvaluationExtras, Family, present_modalities

LOSSES = ("lm", "contrastive", "caption", "memory")
TOKEN_LOSSES = ("lm", "caption", "memory")  # the cross-entropies, returned per row by `forward`


class BitMar(Family):
    modalities = ("image", "text")
    loss_names = LOSSES
    default_losses = ("contrastive", "caption", "memory")
    generates_captions = True

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
        # The state of the memory-write noise's generator (seeded from the global RNG at build time).
        noise = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
        self.register_buffer("noise_state", noise.get_state())
        self.losses: tuple[str, ...] = self.default_losses

    # -- stages --------------------------------------------------------------------------------------

    def set_stage(self, losses: Sequence[str]) -> None:
        self.losses = tuple(losses)
        if "memory" in self.losses:
            self.memory_trained.fill_(True)

    def epoch_records(self) -> list[dict]:
        """`quantisation_report`: -1/0/+1 shares per BitLinear, packed vs fp16 size."""
        return [{"type": "quantisation", **quantisation_report(self)}]

    def plots(self, records: list[dict], folder) -> list:
        from trimodal.training.models.bitmar.plots import plot_quantisation

        quantisation = [r for r in records if r["type"] == "quantisation"]
        return [plot_quantisation(quantisation[-1], folder / "quantisation.png")] if quantisation else []

    # -- encoders ------------------------------------------------------------------------------------

    def _text(self, ids: torch.Tensor) -> torch.Tensor:
        """Pooled encoder states of ids already cut at the batch's extent (`caption_extent`)."""
        mask = ids != 0
        return masked_mean(self.text_encoder(self.token_embedding(ids), mask), mask)

    def export_limits(self) -> list[str]:
        return ["caption generation is not exported: each image's episode is first written into Larimar's "
                "memory (a least-squares solve over the episodes, per query) and the caption is then decoded "
                "token by token with beam search; `mm caption` and `mm search --caption` need the run itself"]

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

    def recalled(self, codes: torch.Tensor, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the episode `codes` and read each one back: (prefix tokens (B, dim), slot weights (B, K)).
        In training, the episodes written are those of the global batch's `rows` (every rank's, gathered);
        each rank reads back its own."""
        written = codes
        if self.training:
            everyone = distributed.gather_rows(codes)
            if rows is not None:
                everyone = everyone[distributed.gather_rows_detached(rows)]
            written = everyone
        memory = self.memory.write(written, self._write_noise(written) if self.training else None)
        read, weights = self.memory.read(memory, codes)
        return self.recall(read.to(codes.dtype)), weights

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Runs saved before the noise generator's state was a buffer have none: they keep this model's.
        state_dict.setdefault(prefix + "noise_state", self.noise_state)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _write_noise(self, episodes: torch.Tensor) -> torch.Tensor:
        """Standard normal noise of `episodes`' shape from the model's own generator, advanced in the buffer."""
        generator = torch.Generator().set_state(self.noise_state.cpu())
        noise = torch.randn(episodes.shape, generator=generator)
        self.noise_state.copy_(generator.get_state())
        return noise.to(episodes.device)

    # -- training ------------------------------------------------------------------------------------

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        present_modalities(self, batch)
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
        """Each row's summed caption cross-entropy and token count ("<loss>_sum", "<loss>_tokens"; zero for
        rows that take no part) for the stage's generative losses."""
        rows = batch.get("text_present", torch.ones(len(ids), dtype=torch.bool, device=ids.device))
        losses = {}
        if "lm" in self.losses:
            losses.update(self._per_row("lm", rows, self.null_prefix.expand(int(rows.sum()), -1, -1), ids[rows]))
        if vision is None:
            return losses
        rows = rows & batch.get("image_present", rows)
        if int(distributed.gather_rows_detached(rows).sum()) < 2:  # the same decision on every rank
            return losses
        if "caption" in self.losses:
            if "memory" in self.losses:
                second = self._memory_prefix(vision, rows, None)
            else:
                second = self.null_prefix[1].expand_as(vision[rows])
            losses.update(self._per_row("caption", rows, torch.stack([vision[rows], second], dim=1), ids[rows]))
        if "memory" in self.losses:
            second = self._memory_prefix(vision, rows, text)
            losses.update(self._per_row("memory", rows, torch.stack([vision[rows], second], dim=1), ids[rows]))
        return losses

    def _memory_prefix(self, vision: torch.Tensor, rows: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
        """What the memory recalls for each of `rows`, written with the global batch's episodes of those rows
        (image-only episodes when `text` is None)."""
        second, _ = self.recalled(self.episodes(vision, text), rows)
        return second[rows]

    def _per_row(self, name: str, rows: torch.Tensor, prefix: torch.Tensor, ids: torch.Tensor) -> dict:
        """Row sums and token counts of a generative loss over `rows` of the batch, zeros for the others."""
        sums, counts = self.caption_loss(prefix, ids)
        where = (rows.nonzero().flatten(),)
        return {f"{name}_sum": sums.new_zeros(len(rows)).index_put(where, sums),
                f"{name}_tokens": counts.new_zeros(len(rows)).index_put(where, counts)}

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.token_embedding.weight.T  # the output head is the tied embedding

    def caption_loss(self, prefix: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: the summed cross-entropy of each next caption token (after start-of-text) given `prefix`
        (B, P, dim), and how many tokens it sums (B,)."""
        inputs, targets = ids[:, :-1], ids[:, 1:]
        hidden = self.decoder(torch.cat([prefix, self.token_embedding(inputs)], dim=1))[:, prefix.shape[1] :]
        real = targets != 0  # padding is never predicted (nor computed)
        token_losses = F.cross_entropy(self.logits(hidden[real]).float(), targets[real], reduction="none")
        owner = real.nonzero()[:, 0]
        sums = torch.zeros(len(ids), dtype=token_losses.dtype, device=ids.device).index_add(0, owner, token_losses)
        return sums, real.sum(dim=1).to(token_losses.dtype)

    def training_loss(self, latents: dict[str, torch.Tensor], present: dict[str, torch.Tensor],
                      weights: dict[str, float] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted sum of this stage's losses (`weights` by loss name, 1 when absent)."""
        weights = weights or {}
        losses = {name: latents[f"{name}_sum"].sum() / latents[f"{name}_tokens"].sum().clamp(min=1)
                  for name in TOKEN_LOSSES if f"{name}_sum" in latents}
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

    @torch.no_grad()
    def caption_images(self, images: torch.Tensor, *, start: int, end: int, beams: int, episode_size: int,
                       batch_size: int = 256) -> tuple[list[list[int]], torch.Tensor]:
        """`generate` over any number of image vectors, in batches of whole episodes (so the memory's
        episodes do not depend on `batch_size`)."""
        batch_size = episode_size * max(1, batch_size // episode_size)
        tokens, weights = [], []
        for first in range(0, len(images), batch_size):
            ids, slot_weights = self.generate(images[first : first + batch_size], start=start, end=end, beams=beams,
                                              episode_size=episode_size)
            tokens += ids
            weights.append(slot_weights)
        return tokens, torch.cat(weights) if weights else torch.zeros(0, self.memory.slots)

    def evaluation_extras(self, context) -> EvaluationExtras | None:
        """Captions of every image of the split, scored (BLEU, METEOR, ROUGE-L, CIDEr), and how they read the memory."""
        from trimodal.training.models.bitmar.captioning import caption_evaluation

        if context.data.images is None or context.data.tokens is None:
            return None
        return caption_evaluation(self, context)


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
