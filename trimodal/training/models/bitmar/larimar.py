"""Larimar's episodic memory (Das et al., ICML 2024; IBM/larimar `GPM`): a one-shot least-squares write
and a pseudo-inverse read.

    addressing   W = Z·M₀†            (N×K: each of the N episode codes over the K slots)
    write        M = W†·Z             (K×C: the least-squares solution of min ‖W·M − Z‖²)
    read         w = z·M†,  ẑ = w·M    (the query projected onto what the memory holds)

M₀ is the learned prior memory. Written with N < C episodes, M's rows span exactly those episodes, so a
read returns the part of the query that the episode explains: a query close to one stored episode
brings back that episode. Pseudo-inverses come from the Ben-Israel–Cohen iteration
A†ₖ₊₁ = 2A†ₖ − A†ₖ·A·A†ₖ (Larimar's `pseudoinverse_approx_step`), matmuls only, or exactly (SVD) with 0 steps.
"""

from __future__ import annotations

import torch
from torch import nn


def pseudo_inverse(a: torch.Tensor, steps: int = 15) -> torch.Tensor:
    """A† of a (…, n, m) matrix. Starts from α·Aᵀ with α = 1/‖A‖²_F rather than Larimar's fixed
    5e-4: the iteration converges when α < 2/σ²_max, which the fixed value breaks once σ_max > 63; the
    Frobenius bound holds at every scale. Directions with σ² ≪ ‖A‖²_F converge last (a mild ridge)."""
    if steps == 0:
        return torch.linalg.pinv(a)
    alpha = 1.0 / a.pow(2).sum(dim=(-2, -1), keepdim=True).clamp(min=1e-12)
    inverse = alpha * a.mT
    for _ in range(steps):
        inverse = 2 * inverse - inverse @ a @ inverse
    return inverse


class EpisodicMemory(nn.Module):
    """K slots of C dims: `write(episodes)` returns a memory, `read(memory, queries)` what it recalls."""

    def __init__(self, slots: int, dim: int, pinv_steps: int = 15, write_noise: float = 1e-6):
        super().__init__()
        self.slots, self.dim, self.pinv_steps, self.write_noise = slots, dim, pinv_steps, write_noise
        self.prior = nn.Parameter(torch.empty(slots, dim))
        nn.init.orthogonal_(self.prior)  # Larimar starts M₀ at the identity; K ≠ C here, so orthonormal

    def address(self, codes: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """w = z·M†: (N, C) codes -> (N, K) slot weights."""
        return codes @ pseudo_inverse(memory, self.pinv_steps)

    def write(self, episodes: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """M = W†·Z, W = Z·M₀†, for (N, C) episode codes; with `noise` (standard normal, the episodes' shape),
        ξ = write_noise · noise is added first (in training)."""
        with torch.autocast(episodes.device.type, enabled=False):  # pseudo-inverses want float32
            episodes = episodes.float()
            if noise is not None and self.write_noise > 0:
                episodes = episodes + self.write_noise * noise.float()
            weights = self.address(episodes, self.prior.float())
            return pseudo_inverse(weights, self.pinv_steps) @ episodes

    def read(self, memory: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(recalled (N, C), slot weights (N, K)) for (N, C) queries."""
        with torch.autocast(queries.device.type, enabled=False):
            weights = self.address(queries.float(), memory)
            return weights @ memory, weights
