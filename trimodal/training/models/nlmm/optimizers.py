"""The two optimizers of Nested Learning: DMGD (momentum as a learned per-coordinate MLP memory) and M3
(multi-scale momentum with Newton–Schulz orthogonalisation and an Adam-style second moment)."""

from __future__ import annotations

import torch

# Muon's quintic Newton–Schulz coefficients: they push every singular value towards ~1 in a few steps.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def _check(problems: list[str]) -> None:
    if problems:
        raise ValueError("invalid optimizer settings: " + "; ".join(problems))


class DMGD(torch.optim.Optimizer):
    r"""Deep Momentum Gradient Descent (Nested Learning, Eq. 50):
    W_{i+1} = W_i + m_{i+1}(u_i),  m_{i+1} = α·m_i − η·∇L^(2)(m_i; u_i).

    Momentum is an associative memory of past gradients; here that memory is a small MLP per coordinate,
    trained online by gradient descent on its own internal loss. Per parameter tensor p with gradient g:

    - key: s = sqrt(mean(g²)) + eps, û = g / s — the gradient in per-tensor RMS units, so the memory is
      scale-free;
    - memory per coordinate: v (shape of p), W1 and W2 (shape (hidden, *p.shape)), initialised to 0, 1, 0;
      m(û) = v + Σ_j W2_j · tanh(W1_j · û), elementwise;
    - internal loss L2 = Σ_c m_c(û_c) · û_c (the dot-product objective under which plain momentum is
      gradient descent), with gradients at the old state ∂v = û, ∂W2_j = û·tanh(W1_j û),
      ∂W1_j = û · W2_j · (1 − tanh²(W1_j û)) · û;
    - inner step with decay α and rate 1 − α, all three from the old values: x ← α·x − (1 − α)·∂x for
      x in (v, W1, W2). W1 decays towards 0 as well: that is Eq. 50's forgetting;
    - update: p ← p·(1 − lr·weight_decay) + lr · m_new(û), m_new using the new v, W1, W2.

    With hidden=0 it is exactly normalised heavy-ball momentum: v ← α·v − (1 − α)·û, p ← p + lr·v.
    State costs (1 + 2·hidden) × the parameters' memory.
    """

    def __init__(self, params, lr: float = 1e-3, alpha: float = 0.9, hidden: int = 2, weight_decay: float = 0.0,
                 eps: float = 1e-12):
        problems = []
        if lr < 0:
            problems.append(f"lr must be >= 0, not {lr}")
        if not 0 <= alpha < 1:
            problems.append(f"alpha must be in [0, 1), not {alpha}")
        if hidden < 0 or int(hidden) != hidden:
            problems.append(f"hidden must be a whole number >= 0, not {hidden}")
        if weight_decay < 0:
            problems.append(f"weight_decay must be >= 0, not {weight_decay}")
        if eps < 0:
            problems.append(f"eps must be >= 0, not {eps}")
        _check(problems)
        super().__init__(params, dict(lr=lr, alpha=alpha, hidden=int(hidden), weight_decay=weight_decay, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = _evaluate(closure)
        for group in self.param_groups:
            lr, alpha, weight_decay = group["lr"], group["alpha"], group["weight_decay"]
            for param in _with_gradients(group):
                state = self.state[param]
                if not state:
                    state["momentum"] = torch.zeros_like(param)
                    if group["hidden"]:
                        memory_shape = (group["hidden"], *param.shape)
                        state["memory_in"] = torch.ones(memory_shape, dtype=param.dtype, device=param.device)
                        state["memory_out"] = torch.zeros(memory_shape, dtype=param.dtype, device=param.device)
                key = param.grad / (param.grad.square().mean().sqrt() + group["eps"])
                recalled = self._update_memory(state, key, alpha)
                param.mul_(1 - lr * weight_decay).add_(recalled, alpha=lr)
        return loss

    @staticmethod
    def _update_memory(state: dict, key: torch.Tensor, alpha: float) -> torch.Tensor:
        """One inner gradient step of the memory on L2 = Σ m(û)·û; returns the new memory's recall m_new(û)."""
        momentum = state["momentum"]
        momentum.mul_(alpha).add_(key, alpha=-(1 - alpha))
        if "memory_in" not in state:
            return momentum
        memory_in, memory_out = state["memory_in"], state["memory_out"]
        activation = torch.tanh(memory_in * key)
        grad_out = key * activation
        grad_in = key * memory_out * (1 - activation.square()) * key
        memory_out.mul_(alpha).add_(grad_out, alpha=-(1 - alpha))
        memory_in.mul_(alpha).add_(grad_in, alpha=-(1 - alpha))
        return momentum + (memory_out * torch.tanh(memory_in * key)).sum(dim=0)


def _evaluate(closure):
    """The closure's loss, computed with gradients on (torch's optimizer contract), or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _with_gradients(group: dict):
    """The group's parameters that have a gradient this step."""
    return (param for param in group["params"] if param.grad is not None)


def newton_schulz(matrix: torch.Tensor, steps: int) -> torch.Tensor:
    """Muon's quintic Newton–Schulz iteration: an approximately semi-orthogonal matrix (singular values
    near 1) with the singular vectors of `matrix`, computed in float32 and returned in its dtype."""
    a, b, c = NS_COEFFICIENTS
    x = matrix.float()
    x = x / (x.norm() + 1e-7)
    tall = x.shape[0] > x.shape[1]
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    if tall:
        x = x.T
    return x.to(matrix.dtype)


def orthogonalise(momentum: torch.Tensor, steps: int) -> torch.Tensor:
    """Newton–Schulz of a momentum of at least two dimensions (as a (shape[0], -1) matrix), rescaled to the
    momentum's RMS; vectors and scalars pass through unchanged.

    The rescaling is our choice, not the paper's: M3 divides the orthogonalised momentum by √v as Adam
    divides its momentum, and keeping the momentum's RMS makes those steps Adam-sized rather than
    depending on the matrix's shape.
    """
    if momentum.ndim < 2:
        return momentum
    orthogonal = newton_schulz(momentum.reshape(momentum.shape[0], -1), steps).reshape(momentum.shape)
    return orthogonal * (_rms(momentum) / (_rms(orthogonal) + 1e-12))


def _rms(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float().square().mean().sqrt()


class M3(torch.optim.Optimizer):
    r"""Multi-scale Momentum Muon (Nested Learning, Alg. 1): a fast momentum updated every step and a slow
    one updated every `chunk` steps from the chunk's summed gradients, both orthogonalised by Newton–Schulz
    and divided by an Adam-style second moment. Per parameter, with step k counted from 1:

    - M1 ← β1·M1 + (1 − β1)·g;  v ← β2·v + (1 − β2)·g²;  S ← S + g
    - when k % chunk == 0: M2 ← β3·M2 + (1 − β3)·S;  S ← 0
    - p ← p·(1 − lr·weight_decay) − lr · (orth(M1) + α·orth(M2)) / (√v + eps)

    orth is `orthogonalise`: Newton–Schulz for tensors of two or more dimensions, rescaled to the
    momentum's RMS (our choice, so that dividing by √v gives Adam-sized steps); identity for vectors.
    There is no bias correction, as in Alg. 1. orth(M2) only changes once a chunk, so it is kept in the
    state rather than recomputed every step: the state costs five times the parameters' memory.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float, float] = (0.9, 0.999, 0.99),
                 alpha: float = 1.0, chunk: int = 8, eps: float = 1e-8, weight_decay: float = 0.0, ns_steps: int = 5):
        problems = []
        if lr < 0:
            problems.append(f"lr must be >= 0, not {lr}")
        if len(betas) != 3:
            problems.append(f"betas must be three numbers (fast, second moment, slow), not {betas}")
        else:
            problems += [f"betas[{i}] must be in [0, 1), not {beta}"
                         for i, beta in enumerate(betas) if not 0 <= beta < 1]
        if alpha < 0:
            problems.append(f"alpha must be >= 0, not {alpha}")
        if chunk < 1 or int(chunk) != chunk:
            problems.append(f"chunk must be a whole number >= 1, not {chunk}")
        if eps < 0:
            problems.append(f"eps must be >= 0, not {eps}")
        if weight_decay < 0:
            problems.append(f"weight_decay must be >= 0, not {weight_decay}")
        if ns_steps < 0 or int(ns_steps) != ns_steps:
            problems.append(f"ns_steps must be a whole number >= 0, not {ns_steps}")
        _check(problems)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), alpha=alpha, chunk=int(chunk), eps=eps,
                                      weight_decay=weight_decay, ns_steps=int(ns_steps)))

    @torch.no_grad()
    def step(self, closure=None):
        loss = _evaluate(closure)
        for group in self.param_groups:
            lr, alpha, ns_steps = group["lr"], group["alpha"], group["ns_steps"]
            fast_beta, second_beta, slow_beta = group["betas"]
            for param in _with_gradients(group):
                grad = param.grad
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    for name in ("fast_momentum", "second_moment", "chunk_sum", "slow_momentum", "slow_direction"):
                        state[name] = torch.zeros_like(param)
                state["step"] += 1
                state["fast_momentum"].mul_(fast_beta).add_(grad, alpha=1 - fast_beta)
                state["second_moment"].mul_(second_beta).addcmul_(grad, grad, value=1 - second_beta)
                state["chunk_sum"].add_(grad)
                if state["step"] % group["chunk"] == 0:
                    state["slow_momentum"].mul_(slow_beta).add_(state["chunk_sum"], alpha=1 - slow_beta)
                    state["chunk_sum"].zero_()
                    state["slow_direction"].copy_(orthogonalise(state["slow_momentum"], ns_steps))
                direction = orthogonalise(state["fast_momentum"], ns_steps) + alpha * state["slow_direction"]
                param.mul_(1 - lr * group["weight_decay"])
                param.addcdiv_(direction, state["second_moment"].sqrt().add_(group["eps"]), value=-lr)
        return loss
