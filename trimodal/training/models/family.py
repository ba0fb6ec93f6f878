"""The one contract between a model family and the rest of trimodal (trainer, evaluation, `mm caption`).

A family is a package `trimodal/training/models/<name>/` whose builder, registered with
`@register_model("<name>")`, takes flat settings (the config's [model] table, plus the sizes the feature
store decides, `STORE_SETTINGS`, for those of them the builder accepts) and returns a `Family`. It ships
`configs/<name>-tiny.toml`, which the registry-driven tests train on the mini dataset (with the store its
`# featurize:` first line asks for); nothing else names the family.

When the trainer calls what, on every rank:

    build  ->  store_inputs()  ->  make_optimization(train, total_steps)  ->  (resume: weights, state)
    each epoch:  set_stage(losses)
        each step:  forward(batch)  ->  rows of every rank gathered  ->  training_loss(latents, present,
                    weights)  ->  backward (DDP averages gradients)  ->  optimization.step(...)
                    ->  after_optimizer_step()
        then:  validation with encode(modality, batch)  ->  epoch_records()  ->  plots(records, folder)

`mm eval` encodes every item with `encode`; `--ttt` calls `adapted_latents(embed, options)`; rank 0 then
adds `evaluation_extras(context)` (captioning, for a family that generates). `mm caption` calls
`caption_images`.

Under torchrun, `forward` runs on each rank's share of the global batch and must return per-row tensors
only (dim 0 = the batch's rows); the trainer gathers each of them from every rank, with gradients, so
`training_loss` always sees the global batch and its loss and gradients are those of one process holding
the whole batch. A family that mixes rows inside `forward` (a memory written from the batch) gathers them
itself with `trimodal.distributed.gather_rows`. Every rank must draw the same random numbers for what it
computes redundantly (seed a generator of its own for that), and do the same collectives in the same order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from trimodal.training.losses import MAX_LOGIT_SCALE, multimodal_infonce

MODALITIES = ("image", "text", "audio")
# Settings the feature store decides (input sizes; the towers it ran), given to a builder that accepts
# them unless the config sets them itself.
STORE_SETTINGS = ("image_dim", "image_tower", "vocab_size", "context_length", "text_tower", "text_dim", "n_mels",
                  "audio_tower")


class EmptyInputError(ValueError):
    """A batch with none of the modalities the model encodes."""


@dataclass
class EvaluationContext:
    """What `evaluation_extras` may use: the split's data, where the run and the shards are, the options."""

    run: Path
    split: str
    data: object  # trimodal.training.data.SplitData
    shards: Path
    store_config: dict
    device: torch.device
    train: dict  # the run's resolved [train] table
    options: dict = field(default_factory=dict)  # e.g. {"beams": 3}


@dataclass
class EvaluationExtras:
    """Sections a family adds to `eval-<split>.json`, and files (name -> JSON lines) written beside it."""

    result: dict = field(default_factory=dict)
    files: dict[str, list[dict]] = field(default_factory=dict)


class Family(nn.Module):
    """The contract (see the module doc). Subclasses set the class attributes that apply and override
    `encode` and `forward`; every other hook has a default that suits a contrastive retrieval model."""

    # Which modalities the family reads; the trainer refuses train.modalities beyond them.
    modalities: tuple[str, ...] = MODALITIES
    # Loss names a [[train.stages]] entry may choose; None: the family's loss is fixed (no stages).
    loss_names: tuple[str, ...] | None = None
    # The losses trained when no stage is configured (families with `loss_names`).
    default_losses: tuple[str, ...] = ()
    # Whether `mm eval --ttt` applies, and which `--ttt-<option>` values it takes ("k", "step").
    has_test_time_training: bool = False
    ttt_options: tuple[str, ...] = ()
    # Whether the family writes captions (`caption_images`, `mm caption`, captioning in `mm eval`).
    generates_captions: bool = False
    # Every family has a learned temperature `logit_scale` (log scale), logged and clamped by the trainer.
    logit_scale: nn.Parameter
    # Families reading patch tokens instead of pooled image embeddings set this (see `store_inputs`).
    image_tokens: bool = False

    # -- encoding -------------------------------------------------------------------------------------

    def encode(self, modality: str, batch: dict) -> torch.Tensor:
        """Unit-length latents (B, latent_dim) of one modality of `batch`, on its own: what retrieval indexes."""
        raise NotImplementedError

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Training latents (and any per-row values the loss needs) of every modality present; raises
        `EmptyInputError` for a batch with none. Per-row tensors only (see the module doc)."""
        raise NotImplementedError

    def store_inputs(self) -> dict:
        """What the model reads from the feature store (`trimodal.training.data.DEFAULT_INPUTS`)."""
        return {"image": "tokens" if self.image_tokens else "embedding"}

    # -- training -------------------------------------------------------------------------------------

    def training_loss(self, latents: dict[str, torch.Tensor], present: dict[str, torch.Tensor],
                      weights: dict[str, float] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss, named parts) of the global batch's `latents`; `present` masks rows per modality,
        `weights` weighs the parts by name. Default: symmetric InfoNCE over every pair of modalities."""
        return multimodal_infonce(latents, present, self.logit_scale, weights)

    def make_optimization(self, train, total_steps: int):
        """How the parameters are stepped (`trimodal.training.optimization.Optimization` or a subclass),
        given the run's [train] settings. Under torchrun every rank steps its replica with the same
        all-reduced gradients, so what a subclass decides must come out the same on every rank."""
        from trimodal.training.optimization import Optimization

        return Optimization(self, train, total_steps)

    def set_stage(self, losses: tuple[str, ...]) -> None:
        """Called at the start of every epoch with the losses its stage trains (`default_losses` without stages)."""

    def after_optimizer_step(self) -> None:
        """Called after every optimizer step; keeps the temperature within open_clip's bound."""
        with torch.no_grad():
            self.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def epoch_records(self) -> list[dict]:
        """Extra records for metrics.jsonl at the end of each epoch (each with its own "type")."""
        return []

    def plots(self, records: list[dict], folder: Path) -> list[Path]:
        """PNG plots of the family's own records (metrics.jsonl, read back) in `folder`; returns the files."""
        return []

    # -- test time --------------------------------------------------------------------------------------

    def ttt_settings(self) -> dict:
        """The test-time training settings in force, recorded in eval-<split>.json."""
        return {}

    def check_ttt_options(self, options: dict) -> list[str]:
        """Problems with `mm eval --ttt-<option>` values (only those given; `ttt_options` says which apply)."""
        return []

    def adapted_latents(self, embed: Callable, options: dict) -> dict[str, torch.Tensor]:
        """Latents of the split with test-time training; the trained weights are unchanged afterwards.
        `embed(encode, every_batch=False)` embeds the split with `encode(modality, batch)`; under torchrun
        each rank embeds its share of the batches unless `every_batch` (a pass whose effect carries from
        batch to batch must see them all, on every rank)."""
        raise NotImplementedError(f"{type(self).__name__} has no test-time training")

    def evaluation_extras(self, context: EvaluationContext) -> EvaluationExtras | None:
        """More of `mm eval`'s result (run on rank 0 only), e.g. captioning metrics."""
        return None

    def caption_images(self, images: torch.Tensor, *, start: int, end: int, beams: int,
                       episode_size: int) -> tuple[list[list[int]], torch.Tensor]:
        """Caption token ids for (N, image_dim) image vectors (families that `generates_captions`)."""
        raise NotImplementedError(f"{type(self).__name__} does not generate captions")

    def cross_modal_attention(self) -> list[str]:
        """Names of the modules whose attention crosses modalities (their maps go to
        plots/cross-modal-attention.png with `train.attention_every`); none by default."""
        return []

    # -- export -------------------------------------------------------------------------------------------

    def export_limits(self) -> list[str]:
        """What `mm export` leaves out, one line each saying why: `encode` of each modality is exported as a
        graph (a layer whose inference form differs from its training form offers `exported()`); what
        changes weights per query or decodes step by step is not."""
        limits = []
        if self.has_test_time_training:
            limits.append("test-time training (mm eval --ttt) is not exported: it moves the model's weights "
                          "with every batch of queries; the graphs compute the trained weights' latents")
        if self.generates_captions:
            limits.append("caption generation is not exported: it decodes token by token with beam search; "
                          "`mm caption` and `mm search --caption` need the run itself")
        return limits


def store_settings(store_config: dict) -> dict:
    """The `STORE_SETTINGS` a feature store decides: its input sizes, and the towers it ran (not vectors a
    dataset shipped)."""
    from trimodal.features.store import audio_layout

    settings = {}
    image, text, audio = store_config.get("image"), store_config.get("text"), store_config.get("audio")
    if image:
        settings["image_dim"] = image["embed_dim"]
        if image.get("family") != "precomputed":
            settings["image_tower"] = image["encoder"]
    if text:
        settings["vocab_size"], settings["context_length"] = text["vocab_size"], text["context_length"]
        if text.get("tower"):
            settings["text_tower"], settings["text_dim"] = text["tower"]["encoder"], text["tower"]["embed_dim"]
    if audio:
        settings["n_mels"] = audio_layout(audio)[1]  # the frame width: mel bands or a speech tower's width
        if "n_mels" not in audio:
            settings["audio_tower"] = audio["encoder"]
    return settings


def present_modalities(model: Family, batch: dict) -> list[str]:
    """The modalities of `model` that `batch` holds, in the canonical order; `EmptyInputError` for none."""
    present = [m for m in MODALITIES if m in model.modalities and (m in batch or (m == "image" and "image_tokens" in batch))]
    if not present:
        readable = ", ".join(model.modalities)
        raise EmptyInputError(f"empty input: a batch needs at least one of image, text (this model reads {readable})"
                              if model.modalities != MODALITIES else
                              "empty input: a batch needs at least one of image, text, audio")
    return present
