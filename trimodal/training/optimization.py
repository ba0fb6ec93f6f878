"""How a model's parameters are stepped: the learning-rate schedule, clipping and the optimizer(s).

The trainer calls `Optimization.step` once per optimizer step. The default is one AdamW over every
parameter; a model family with its own rules (per-level optimizers on their own periods, a learned
learning-rate controller) returns a subclass from `Family.make_optimization(train, total_steps)`.
Everything an exact resume needs comes out of `state_dict()`.
"""

from __future__ import annotations

import math

import torch

from trimodal.training.settings import TrainConfig


def lr_at(step: int, train: TrainConfig, total_steps: int) -> float:
    # 1) linear warm-up, 2) cosine decay to lr * min_lr_ratio at the last step
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    progress = min(1.0, (step - train.warmup_steps) / max(1, total_steps - train.warmup_steps))
    floor = train.lr * train.min_lr_ratio
    return floor + (train.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def decay_groups(named_parameters, weight_decay: float) -> list[dict]:
    """Two parameter groups: weight decay on matrices, none on biases, norms, embeddings, memory slots,
    positions and the temperature."""
    decay, no_decay = [], []
    for name, parameter in named_parameters:
        exempt = parameter.ndim < 2 or name.endswith((".slots", "positions")) or "embedding" in name or "tokens." in name
        (no_decay if exempt else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Optimization:
    """One AdamW over `parameters` (default: all of the model's), stepped every step on the schedule."""

    def __init__(self, model: torch.nn.Module, train: TrainConfig, total_steps: int, parameters=None):
        self.model, self.train, self.total_steps = model, train, total_steps
        named = list(parameters) if parameters is not None else [(n, p) for n, p in model.named_parameters()
                                                                  if p.requires_grad]  # frozen towers: no state
        self.optimizer = torch.optim.AdamW(decay_groups(named, train.weight_decay), lr=train.lr)
        self.lr = train.lr

    def schedule(self, step: int) -> float:
        """The schedule's learning rate at `step`; subclasses scale it."""
        return lr_at(step, self.train, self.total_steps)

    def step(self, step: int, loss: torch.Tensor) -> int:
        """Clip every gradient together, step, clear gradients; returns the next step number."""
        self.lr = self.schedule(step)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train.grad_clip)
        self.optimizer.step()
        self.after_step(step + 1, loss.detach(), grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        return step + 1

    def after_step(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Hook for subclasses, called after the main optimizer stepped (gradients still present)."""

    def end_epoch(self, val_mean_recall: float | None) -> None:
        """Hook for subclasses: an epoch ended with this validation mean recall (None without val)."""

    def log_record(self) -> dict:
        """Extra fields for the training record in metrics.jsonl (and TensorBoard)."""
        return {}

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])


def flatten(record: dict, prefix: str = "") -> dict[str, float]:
    """{"levels": {"fast": {"updates": 3}}} -> {"levels/fast/updates": 3.0}: TensorBoard (and wandb) tags; a
    list of numbers is one tag per entry (`heads/x/0`, `heads/x/1`, …)."""
    flat = {}
    for key, value in record.items():
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, tag + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[tag] = float(value)
        elif isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            flat.update({f"{tag}/{i}": float(v) for i, v in enumerate(value)})  # e.g. one number per attention head
    return flat
