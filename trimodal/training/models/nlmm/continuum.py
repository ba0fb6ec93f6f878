"""Multi-frequency updates of a Continuum Memory System (Nested Learning, Eq. 71).

Level ℓ has a period C_ℓ (`chunk_size`), a learning rate and an optimizer of its own. Its parameters
change only on steps C_ℓ, 2·C_ℓ, …: the gradients of the steps in between are accumulated and the
update uses their mean. Everything that is not a CMS level (embeddings, attention, projections) is
stepped every step by the trainer's AdamW. The schedule (warm-up, cosine) scales every level's rate
the same way, and clipping is applied to all gradients together before accumulation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trimodal.errors import ConfigError
from trimodal.training.settings import TrainConfig
from trimodal.training.optimization import Optimization, decay_groups

LEVEL_OPTIMIZERS = ("dmgd", "adamw", "m3")
LEVEL_KEYS = {"name": str, "chunk_size": int, "lr": float, "optimizer": str}


def check_levels(levels: list) -> list[dict]:
    """Validated CMS level settings; every problem is reported at once."""
    problems, names = [], []
    if not isinstance(levels, list) or not levels:
        raise ConfigError("cms_levels must be a non-empty list of levels ([[model.cms_levels]] tables)")
    for position, level in enumerate(levels):
        where = f"cms_levels[{position}]"
        if not isinstance(level, dict):
            problems.append(f"{where} must be a table with {', '.join(LEVEL_KEYS)}")
            continue
        unknown = sorted(set(level) - set(LEVEL_KEYS))
        missing = sorted(set(LEVEL_KEYS) - set(level))
        if unknown:
            problems.append(f"{where} has no setting {', '.join(unknown)} (settings: {', '.join(LEVEL_KEYS)})")
        if missing:
            problems.append(f"{where} lacks {', '.join(missing)}")
        if not isinstance(level.get("name", ""), str) or not str(level.get("name", "")).isidentifier():
            problems.append(f"{where} name must be an identifier (got {level.get('name')!r})")
        names.append(level.get("name"))
        chunk = level.get("chunk_size", 1)
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            problems.append(f"{where} chunk_size must be an integer ≥ 1 (got {chunk!r})")
        lr = level.get("lr", 1.0)
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0:
            problems.append(f"{where} lr must be positive (got {lr!r})")
        if level.get("optimizer", "adamw") not in LEVEL_OPTIMIZERS:
            problems.append(f"{where} optimizer must be one of {', '.join(LEVEL_OPTIMIZERS)} "
                            f"(got {level.get('optimizer')!r})")
    if len(set(names)) != len(names):
        problems.append(f"cms_levels names must differ (got {names})")
    if problems:
        raise ConfigError("; ".join(problems))
    return [{**level, "lr": float(level["lr"])} for level in levels]


def level_optimizer(kind: str, named, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    from trimodal.training.models.nlmm.optimizers import DMGD, M3

    groups = decay_groups(named, weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if kind == "dmgd":
        return DMGD(groups, lr=lr)
    return M3(groups, lr=lr)


@dataclass
class Level:
    name: str
    period: int
    lr: float
    optimizer: torch.optim.Optimizer
    parameters: list[torch.nn.Parameter]
    sums: list[torch.Tensor]  # gradients accumulated since the last update
    pending: int = 0  # steps accumulated in `sums`
    updates: int = 0
    last_change: float = 0.0  # ‖Δθ‖ of the last update


class ContinuumOptimization(Optimization):
    def __init__(self, model: torch.nn.Module, train: TrainConfig, total_steps: int, levels: list[dict],
                 level_parameters: dict[str, list]):
        in_levels = {id(p) for named in level_parameters.values() for _, p in named}
        base = [(n, p) for n, p in model.named_parameters() if id(p) not in in_levels]
        super().__init__(model, train, total_steps, base)
        self.levels = []
        for spec in levels:
            named = level_parameters[spec["name"]]
            self.levels.append(Level(spec["name"], spec["chunk_size"], spec["lr"],
                                     level_optimizer(spec["optimizer"], named, spec["lr"], train.weight_decay),
                                     [p for _, p in named], [torch.zeros_like(p) for _, p in named]))

    def after_step(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Accumulate each level's (clipped) gradients; step the levels whose period ends at `step`."""
        scale = self.lr / self.train.lr  # where the schedule is, applied to every level's own rate
        for level in self.levels:
            for parameter, total in zip(level.parameters, level.sums):
                if parameter.grad is not None:
                    total.add_(parameter.grad)
                    parameter.grad = None  # the main optimizer does not clear it: the next backward starts afresh
            level.pending += 1
            if step % level.period == 0:
                self._update(level, level.lr * scale)

    @torch.no_grad()
    def _update(self, level: Level, lr: float) -> None:
        before = [p.detach().clone() for p in level.parameters]
        for parameter, total in zip(level.parameters, level.sums):
            parameter.grad = total / level.pending  # the mean gradient of the chunk
        for group in level.optimizer.param_groups:
            group["lr"] = lr
        level.optimizer.step()
        level.optimizer.zero_grad(set_to_none=True)
        change = sum(float((p - b).float().pow(2).sum()) for p, b in zip(level.parameters, before))
        level.last_change = change ** 0.5
        level.updates += 1
        level.pending = 0
        for total in level.sums:
            total.zero_()

    def log_record(self) -> dict:
        return {"levels": {level.name: {"updates": level.updates, "change_norm": level.last_change,
                                        "lr": level.lr * self.lr / self.train.lr} for level in self.levels}}

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["levels"] = {level.name: {"optimizer": level.optimizer.state_dict(), "sums": list(level.sums),
                                        "pending": level.pending, "updates": level.updates,
                                        "last_change": level.last_change} for level in self.levels}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for level in self.levels:
            saved = state["levels"][level.name]
            level.optimizer.load_state_dict(saved["optimizer"])
            for total, value in zip(level.sums, saved["sums"]):
                total.copy_(value)
            level.pending, level.updates, level.last_change = saved["pending"], saved["updates"], saved["last_change"]
