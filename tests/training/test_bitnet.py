"""BitNet b1.58 layers, Larimar's least-squares memory and beam search, checked against hand computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from trimodal.training.models.bitmar.generation import beam_search
from trimodal.training.models.bitmar.bitnet import BitLinear, BitTransformer, quantisation_report
from trimodal.training.models.bitmar.larimar import EpisodicMemory, pseudo_inverse


def test_bitlinear_forward_is_rmsnorm_then_absmax8_activations_times_absmean_ternary_weights():
    layer = BitLinear(4, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.9, -0.1, 0.4, -0.6], [0.05, 0.7, -0.3, 0.2]]))
    x = torch.tensor([[[1.0, -2.0, 0.5, 3.0]]])
    # By hand. RMSNorm: rms = sqrt((1 + 4 + 0.25 + 9) / 4) = sqrt(3.5625) = 1.8875
    rms = math.sqrt((1 + 4 + 0.25 + 9) / 4 + 1e-6)
    normed = [v / rms for v in (1.0, -2.0, 0.5, 3.0)]
    # Absmax to 8 bits: the largest |value| maps to 127.
    scale = 127 / max(abs(v) for v in normed)
    x_q = [round(v * scale) / scale for v in normed]
    # Absmean ternary: γ = mean|W| = (0.9+0.1+0.4+0.6+0.05+0.7+0.3+0.2)/8 = 0.40625; round(W/γ) clipped to ±1.
    gamma = 3.25 / 8
    codes = [[1, 0, 1, -1], [0, 1, -1, 0]]  # 0.9/γ=2.2→1, -0.1/γ=-0.25→0, 0.4/γ=0.98→1, ..., 0.2/γ=0.49→0
    expected = [sum(c * gamma * v for c, v in zip(row, x_q)) for row in codes]
    assert torch.allclose(layer(x)[0, 0], torch.tensor(expected), atol=1e-5)


def test_gradients_reach_the_latent_weights_through_the_straight_through_estimators():
    torch.manual_seed(0)
    layer = BitLinear(8, 3)
    x = torch.randn(5, 8, requires_grad=True)
    upstream = torch.randn(5, 3)
    (layer(x) * upstream).sum().backward()
    # STE: dL/dW = dL/dW_q = upstreamᵀ·x_q (the quantised activations), though W_q is a step function of W.
    with torch.no_grad():
        normed = layer.norm(x)
        x_q = (normed * (127 / normed.abs().amax(-1, keepdim=True))).round() / (127 / normed.abs().amax(-1, keepdim=True))
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert torch.allclose(layer.weight.grad, upstream.T @ x_q, atol=1e-5)
    assert x.grad is not None and x.grad.abs().sum() > 0  # and the input, through the activation STE
    assert layer.norm.weight.grad is not None


def test_quantisation_report_counts_ternary_shares_and_packed_size():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), BitLinear(4, 6))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, -1.0, 0.0, 0.0]] * 6))  # γ = 0.5: codes 1, -1, 0, 0
    report = quantisation_report(model)
    layer = report["layers"]["1"]
    assert layer == {"weights": 24, "-1": 0.25, "0": 0.5, "+1": 0.25}
    assert report["ternary_weights"] == 24
    assert report["full_precision_values"] == 40 + 4  # the embedding and the norm's gain
    assert report["fp16_bytes"] == 2 * (24 + 44)
    assert report["packed_bytes"] == math.ceil(24 * math.log2(3) / 8 + 2 + 2 * 44)


def test_causal_bit_transformer_does_not_look_ahead():
    torch.manual_seed(0)
    decoder = BitTransformer(16, 4, 2, causal=True).eval()
    x = torch.randn(2, 6, 16)
    changed = x.clone()
    changed[:, 4:] = torch.randn(2, 2, 16)
    assert torch.allclose(decoder(x)[:, :4], decoder(changed)[:, :4], atol=1e-5)


@pytest.mark.parametrize("steps", [0, 15])
def test_pseudo_inverse_matches_the_exact_one(steps):
    torch.manual_seed(0)
    a = torch.randn(6, 20)
    assert torch.allclose(pseudo_inverse(a, steps), torch.linalg.pinv(a), atol=1e-4)


def test_larimar_write_stores_the_episode_and_read_projects_onto_it():
    torch.manual_seed(0)
    memory = EpisodicMemory(slots=32, dim=16, pinv_steps=15).eval()
    episodes = torch.randn(5, 16)
    written = memory.write(episodes)
    assert written.shape == (32, 16)
    # Least squares: W·M reproduces the episodes it was written with (W = Z·M₀†).
    addressing = episodes @ torch.linalg.pinv(memory.prior.detach())
    assert torch.allclose(addressing @ written, episodes, atol=1e-3)
    recalled, weights = memory.read(written, episodes)
    assert weights.shape == (5, 32) and torch.allclose(recalled, episodes, atol=1e-3)
    # A query comes back as its projection onto the span of the stored episodes.
    query = torch.randn(3, 16)
    basis = torch.linalg.qr(episodes.T).Q  # (16, 5)
    recalled, _ = memory.read(written, query)
    assert torch.allclose(recalled, query @ basis @ basis.T, atol=1e-3)


def _table_model(table: dict[tuple, dict[int, float]], vocabulary: int = 4):
    """next_log_probs from a table: prefix (tokens after start) -> {token: probability}."""

    def next_log_probs(rows, ids):
        out = torch.full((len(ids), vocabulary), -30.0)
        for i, tokens in enumerate(ids.tolist()):
            for token, p in table.get(tuple(tokens[1:]), {3: 1.0}).items():
                out[i, token] = math.log(p)
        return out

    return next_log_probs


def test_beam_search_finds_the_better_sequence_that_greedy_misses():
    # start 0, end 3. Greedy takes 1 (0.6) then 1 or 2 (0.5 each): 0.30. Beam 2 finds 2 then 1 (0.4 × 0.9 = 0.36).
    table = {(): {1: 0.6, 2: 0.4}, (1,): {1: 0.5, 2: 0.5}, (2,): {1: 0.9, 3: 0.1},
             (1, 1): {3: 1.0}, (1, 2): {3: 1.0}, (2, 1): {3: 1.0}}
    step = _table_model(table)
    assert beam_search(step, 1, start=0, end=3, beams=1, length_penalty=0.0) == [[1, 1]]
    assert beam_search(step, 1, start=0, end=3, beams=2, length_penalty=0.0) == [[2, 1]]


def test_beam_search_stops_at_max_tokens_and_handles_rows_independently():
    step = _table_model({(): {1: 1.0}, (1,): {1: 1.0}, (1, 1): {1: 1.0}, (1, 1, 1): {1: 1.0}})
    assert beam_search(step, 2, start=0, end=3, beams=3, max_tokens=3) == [[1, 1, 1], [1, 1, 1]]
    with pytest.raises(ValueError):
        beam_search(step, 1, start=0, end=3, beams=0)


def test_bitlinear_under_gradient_descent_moves_latent_weights_across_ternary_codes():
    torch.manual_seed(0)
    layer = BitLinear(8, 8)
    target = torch.randn(64, 8)
    x = torch.randn(64, 8)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    first = F.mse_loss(layer(x), target).item()
    for _ in range(200):
        optimizer.zero_grad()
        F.mse_loss(layer(x), target).backward()
        optimizer.step()
    assert F.mse_loss(layer(x), target).item() < 0.8 * first
