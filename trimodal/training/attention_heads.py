"""Attention heads during training, for every family with attention (`train.attention_every = N`, default 50).

Every N optimizer steps rank 0 runs the model in eval mode, without gradients, on a fixed probe batch (the
first `PROBE_ROWS` rows of the validation split) and records every attention its modules compute: the
calls to `scaled_dot_product_attention` (nn.MultiheadAttention's non-fused path, BitNet's attention, the
split towers' attention), each credited to the innermost module running it. Nothing is asked of a family
beyond doing its attention through that function, which is how torch computes it; a family names its
cross-modal attention modules in `Family.cross_modal_attention()`.

A head's importance is its focus: 1 − H/log n, with H the entropy (nats) of a query position's attention
over the n keys it may attend to (positions with one key left out), averaged over the probe batch's query
positions. 0 is uniform attention, 1 one key only; the record is `{"type": "attention", "heads":
{module: [focus of head 0, …]}}` in metrics.jsonl (and wandb when it is on), `plots/attention-heads.png`
draws heads × steps, and `plots/cross-modal-attention.png` a cross-modal module's attention (mean over
heads) for the first three probe rows at the last probe. The probe forks the random state, so a run
with it trains exactly as without it.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

PROBE_ROWS = 8
MAP_ROWS = 3


@contextmanager
def recorded_attention(model: torch.nn.Module):
    """{module name: [(B, H, Q, K) attention weights, (B, H, Q) attendable keys), …]} of what runs inside the block."""
    records: dict[str, list[torch.Tensor]] = {}
    running: list[str] = []
    hooks = []

    def entered(name: str):
        def hook(_module, _inputs) -> None:
            running.append(name)
        return hook

    def left(_module, _inputs, _output) -> None:  # a forward hook that returned something would replace the output
        running.pop()

    for name, module in model.named_modules():
        hooks.append(module.register_forward_pre_hook(entered(name)))
        hooks.append(module.register_forward_hook(left))
    original = F.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **options):
        if query.dim() == 4:
            records.setdefault(running[-1] if running else "", []).append(
                attention_weights(query, key, attn_mask, is_causal, scale))
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, **options)

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused kernel computes attention without the function
    F.scaled_dot_product_attention = recording
    try:
        yield records
    finally:
        F.scaled_dot_product_attention = original
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for hook in hooks:
            hook.remove()


def attention_weights(query, key, attn_mask=None, is_causal=False, scale=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(q·kᵀ·scale + mask) as scaled_dot_product_attention computes it, (B, H, Q, K) float32 on the CPU
    (a row with no key to attend to all zeros); how many keys each query position may attend to, (B, H, Q))."""
    logits = (query.float() @ key.float().transpose(-2, -1)) * (scale or 1 / math.sqrt(query.shape[-1]))
    if is_causal:
        logits = logits.masked_fill(torch.ones(logits.shape[-2:], dtype=torch.bool, device=logits.device)
                                    .triu(1), -torch.inf)
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, -torch.inf) if attn_mask.dtype == torch.bool else logits + attn_mask
    return logits.softmax(-1).nan_to_num(0.0).cpu(), torch.isfinite(logits).sum(-1).cpu()


def head_focus(weights: torch.Tensor, keys: torch.Tensor | None = None) -> list[float]:
    """Per head of (B, H, Q, K) weights: 1 − entropy / log(attendable keys), over query positions with more
    than one attendable key (NaN when there is none); `keys` (B, H, Q) counts them (default: every key)."""
    if keys is None:
        keys = torch.full(weights.shape[:-1], weights.shape[-1])
    entropy = -(weights * weights.clamp_min(1e-30).log()).sum(-1)
    usable = keys > 1
    focus = torch.where(usable, 1 - entropy / keys.clamp_min(2).float().log(), torch.zeros_like(entropy))
    counts = usable.sum((0, 2))
    return [float(f / c) if c else float("nan") for f, c in zip(focus.sum((0, 2)), counts)]


class AttentionProbe:
    """Records head focus every `every` optimizer steps on a fixed probe batch; keeps the last maps of the
    family's cross-modal attention modules for `plot`."""

    def __init__(self, batch: dict, every: int):
        self.batch, self.every = batch, every
        self.maps: dict[str, np.ndarray] = {}

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def __call__(self, model, epoch: int, step: int) -> dict:
        """The "attention" record of `model` (a Family) now; the model is left in the mode it was in."""
        device = next(model.parameters()).device
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.batch.items()}
        training = model.training
        devices = [device] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad(), recorded_attention(model) as records:
                model.eval()
                model(batch)
        finally:
            model.train(training)
        heads = {name: head_focus(torch.cat([w for w, _ in calls]), torch.cat([k for _, k in calls]))
                 if _same_shape(calls) else
                 [float(np.nanmean(values)) for values in zip(*(head_focus(w, k) for w, k in calls))]
                 for name, calls in records.items()}
        cross = set(model.cross_modal_attention())
        # A module run on one modality and then on several (a fusion over a subset) is drawn at its widest call.
        self.maps = {name: max((w for w, _ in calls), key=lambda w: w.shape[-1])[:MAP_ROWS].mean(1).numpy()
                     for name, calls in records.items() if name in cross}
        return {"type": "attention", "epoch": epoch, "step": step, "samples": len(batch["keys"]), "heads": heads}

    def plot(self, folder: Path) -> list[Path]:
        """plots/cross-modal-attention.png from the last probe (nothing when the family has none)."""
        if not self.maps:
            return []
        from trimodal.training.plots import plot_attention_maps

        return [plot_attention_maps(self.maps, folder / "cross-modal-attention.png")]


def _same_shape(calls: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    return len({tuple(w.shape[1:]) for w, _ in calls}) == 1
