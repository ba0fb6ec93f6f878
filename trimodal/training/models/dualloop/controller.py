"""The outer loop of `dualloop`: a learned controller that scales the learning rate every few steps.

Every window of `update_frequency` optimizer steps, an LSTM cell reads five statistics of training
(log mean loss, relative loss change, log mean gradient norm, latest validation mean recall, log of
the multiplier in use) and gives the mean μ of a Gaussian over the log learning-rate multiplier; the
next window runs at the schedule's rate × clamp(exp(a), min, max), a ~ N(μ, exploration²).

Training signal: REINFORCE on the next window's relative loss decrease. The action chosen at the end
of window w−1 is rewarded with r_w = (L̄_{w−1} − L̄_w) / L̄_{w−1}, the controller's loss is
−(r_w − b)·log π(a), b a running mean of rewards (momentum 0.9), one Adam step per window. Why this
signal: it is available every window at no cost (no extra forward passes, no held-out batch), it
measures exactly what the action influenced (the progress made while the multiplier was in force), it
is scale-free across datasets and stages of training, and the baseline removes the slow trend (loss
falls faster early on) so the controller learns the effect of its choice, not the schedule's. The
validation recall is only an input: one value per epoch is too sparse a reward. The price is bias
toward short-term progress (a high rate can lower the loss now and hurt later); the bounded multiplier
and the decaying schedule it multiplies keep that in check.

The sampling noise comes from a generator of the optimization's own, seeded by `train.seed`, and every
number the next update needs (that generator's state included) is in `state_dict()`, so a resumed run
picks the same multipliers. Under torchrun every rank sees the same window statistics (the loss is the
global batch's, the gradient norm that of the all-reduced gradients), and rank 0's decision is final:
its multiplier, action and controller parameters are broadcast at the end of every window, so all ranks
step with one learning rate even if their floating-point arithmetic drifted apart.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from trimodal.training.settings import TrainConfig
from trimodal.training.optimization import Optimization

FEATURES = 5  # log loss, relative loss change, log gradient norm, validation recall, log multiplier
BASELINE_MOMENTUM = 0.9
TINY = 1e-8  # floor under logs and divisions


class LearningRateController(nn.Module):
    """LSTM cell + linear head: window statistics -> a Gaussian policy over the log multiplier."""

    def __init__(self, hidden: int, multiplier_min: float, multiplier_max: float, exploration: float):
        super().__init__()
        self.cell = nn.LSTMCell(FEATURES, hidden)
        self.head = nn.Linear(hidden, 1)
        self.multiplier_min, self.multiplier_max, self.exploration = multiplier_min, multiplier_max, exploration
        self.log_min, self.log_max = math.log(multiplier_min), math.log(multiplier_max)
        # μ is squashed into [log min, log max] (so it cannot run away where every action is clamped)
        # and starts at log 1: the first windows run the plain schedule.
        nn.init.zeros_(self.head.weight)
        start = min(max((0.0 - self.log_min) / max(self.log_max - self.log_min, TINY), 0.01), 0.99)
        nn.init.constant_(self.head.bias, math.log(start / (1 - start)))

    def initial_state(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        zeros = torch.zeros(1, self.cell.hidden_size, device=device)
        return zeros, zeros.clone()

    def policy(self, features: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
               ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """μ (a scalar) for `features` (FEATURES,), and the cell's next (h, c)."""
        h, c = self.cell(features.unsqueeze(0), state)
        squashed = torch.sigmoid(self.head(h)).squeeze()
        return self.log_min + (self.log_max - self.log_min) * squashed, (h, c)

    def sample(self, mean: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """a ~ N(μ, exploration²), the noise drawn from `generator` (a CPU generator)."""
        noise = torch.randn((), generator=generator).to(mean.device)
        return (mean + self.exploration * noise).detach()

    def log_prob(self, action: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        return torch.distributions.Normal(mean, self.exploration).log_prob(action)

    def multiplier(self, action: torch.Tensor) -> float:
        return min(max(math.exp(float(action)), self.multiplier_min), self.multiplier_max)


class ControlledOptimization(Optimization):
    """AdamW over every parameter but the controller's, at the schedule's rate × the controller's
    multiplier; the controller is stepped by its own Adam once per window."""

    def __init__(self, model: nn.Module, train: TrainConfig, total_steps: int, controller: LearningRateController,
                 *, update_frequency: int, controller_lr: float):
        controlled = {id(p) for p in controller.parameters()}
        super().__init__(model, train, total_steps,
                         [(name, p) for name, p in model.named_parameters() if id(p) not in controlled])
        self.controller, self.update_frequency = controller, update_frequency
        self.controller_optimizer = torch.optim.Adam(controller.parameters(), lr=controller_lr)
        self.device = next(controller.parameters()).device
        self.multiplier = 1.0
        self.lstm_state = controller.initial_state(self.device)
        self.loss_sum = torch.zeros((), device=self.device)  # of the window in progress, on the device
        self.grad_norm_sum = torch.zeros((), device=self.device)
        self.window_steps = 0
        self.previous_loss: float | None = None  # mean loss of the last finished window
        self.action: dict | None = None  # the multiplier in force: action, features and (h, c) it came from
        self.baseline = 0.0
        self.last_reward: float | None = None
        self.windows = 0
        self.val_recall = 0.0
        self.generator = torch.Generator().manual_seed(train.seed)

    def schedule(self, step: int) -> float:
        return super().schedule(step) * self.multiplier

    def after_step(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.loss_sum += loss.detach().float().to(self.device)
        self.grad_norm_sum += torch.as_tensor(grad_norm).detach().float().to(self.device)
        self.window_steps += 1
        if step % self.update_frequency == 0:
            self.end_window()

    def end_window(self) -> None:
        """Reward the multiplier that was in force, update the controller, choose the next multiplier."""
        mean_loss, mean_grad_norm = (torch.stack([self.loss_sum, self.grad_norm_sum]) / self.window_steps).tolist()
        self.loss_sum.zero_()
        self.grad_norm_sum.zero_()
        self.window_steps = 0
        self.windows += 1
        if not (math.isfinite(mean_loss) and math.isfinite(mean_grad_norm)):
            self.previous_loss = None  # nothing sound to learn from or compare with; keep the multiplier
            return
        if self.previous_loss is not None and self.action is not None:
            self.reinforce((self.previous_loss - mean_loss) / max(self.previous_loss, TINY))
        self.act(self.features(mean_loss, mean_grad_norm))
        self.previous_loss = mean_loss
        self.follow_rank_zero()

    def follow_rank_zero(self) -> None:
        """Under torchrun: rank 0's controller, its decision and its baseline on every rank (one decision)."""
        from trimodal import distributed

        distributed.broadcast_tensors(list(self.controller.parameters()) + list(self.lstm_state))
        decided = distributed.broadcast_object({"multiplier": self.multiplier, "baseline": self.baseline,
                                                "action": {k: v.cpu() for k, v in self.action.items()}})
        self.multiplier, self.baseline = decided["multiplier"], decided["baseline"]
        self.action = {k: v.to(self.device) for k, v in decided["action"].items()}

    def features(self, mean_loss: float, mean_grad_norm: float) -> torch.Tensor:
        change = 0.0 if self.previous_loss is None else (mean_loss - self.previous_loss) / max(self.previous_loss, TINY)
        return torch.tensor([math.log(max(mean_loss, TINY)), min(max(change, -1.0), 1.0),
                             math.log(max(mean_grad_norm, TINY)), self.val_recall, math.log(self.multiplier)],
                            device=self.device)

    def reinforce(self, reward: float) -> None:
        """One Adam step on −(reward − baseline)·log π(action), log π recomputed with today's parameters."""
        advantage = reward - self.baseline
        with torch.enable_grad():
            mean, _ = self.controller.policy(self.action["features"], (self.action["h"], self.action["c"]))
            loss = -advantage * self.controller.log_prob(self.action["action"], mean)
        self.controller_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.controller_optimizer.step()
        self.controller_optimizer.zero_grad(set_to_none=True)
        self.baseline = BASELINE_MOMENTUM * self.baseline + (1 - BASELINE_MOMENTUM) * reward
        self.last_reward = reward

    @torch.no_grad()
    def act(self, features: torch.Tensor) -> None:
        h, c = self.lstm_state
        mean, self.lstm_state = self.controller.policy(features, (h, c))
        action = self.controller.sample(mean, self.generator)
        self.action = {"action": action, "features": features, "h": h, "c": c}
        self.multiplier = self.controller.multiplier(action)

    def end_epoch(self, val_mean_recall: float | None) -> None:
        self.val_recall = float(val_mean_recall) if val_mean_recall is not None else 0.0

    def log_record(self) -> dict:
        return {"controller": {"lr_multiplier": self.multiplier, "reward": self.last_reward,
                               "baseline": self.baseline, "windows": self.windows}}

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["controller"] = {
            "optimizer": self.controller_optimizer.state_dict(),
            "h": self.lstm_state[0].detach().clone(), "c": self.lstm_state[1].detach().clone(),
            "loss_sum": self.loss_sum.clone(), "grad_norm_sum": self.grad_norm_sum.clone(),
            "window_steps": self.window_steps, "previous_loss": self.previous_loss,
            "action": None if self.action is None else {k: v.detach().clone() for k, v in self.action.items()},
            "baseline": self.baseline, "last_reward": self.last_reward, "windows": self.windows,
            "multiplier": self.multiplier, "val_recall": self.val_recall, "generator": self.generator.get_state(),
        }
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        saved = state["controller"]
        self.controller_optimizer.load_state_dict(saved["optimizer"])
        self.lstm_state = (saved["h"].to(self.device), saved["c"].to(self.device))
        self.loss_sum = saved["loss_sum"].to(self.device).clone()
        self.grad_norm_sum = saved["grad_norm_sum"].to(self.device).clone()
        self.window_steps, self.previous_loss = saved["window_steps"], saved["previous_loss"]
        self.action = None if saved["action"] is None else {k: v.to(self.device) for k, v in saved["action"].items()}
        self.baseline, self.last_reward, self.windows = saved["baseline"], saved["last_reward"], saved["windows"]
        self.multiplier, self.val_recall = saved["multiplier"], saved["val_recall"]
        self.generator.set_state(saved["generator"])
