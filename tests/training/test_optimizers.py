import io

import pytest
import torch

from trimodal.training.models.nlmm.optimizers import DMGD, M3, newton_schulz, orthogonalise


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _step_with(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter, grad: torch.Tensor) -> None:
    param.grad = grad.clone()
    optimizer.step()


def _rms(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.square().mean().sqrt()


def _reference_dmgd(param, grads, lr, alpha, hidden, weight_decay=0.0, eps=1e-12):
    """DMGD written out from its formulas, one hidden unit at a time."""
    param = param.clone()
    v = torch.zeros_like(param)
    w1 = [torch.ones_like(param) for _ in range(hidden)]
    w2 = [torch.zeros_like(param) for _ in range(hidden)]
    for g in grads:
        u = g / (torch.sqrt(torch.mean(g * g)) + eps)
        grad_v = u
        grad_w2 = [u * torch.tanh(w1[j] * u) for j in range(hidden)]
        grad_w1 = [u * w2[j] * (1 - torch.tanh(w1[j] * u) ** 2) * u for j in range(hidden)]
        v = alpha * v - (1 - alpha) * grad_v
        w2 = [alpha * w2[j] - (1 - alpha) * grad_w2[j] for j in range(hidden)]
        w1 = [alpha * w1[j] - (1 - alpha) * grad_w1[j] for j in range(hidden)]
        recalled = v + sum((w2[j] * torch.tanh(w1[j] * u) for j in range(hidden)), torch.zeros_like(param))
        param = param * (1 - lr * weight_decay) + lr * recalled
    return param


@pytest.mark.parametrize("shape", [(7,), (3, 5)])
def test_dmgd_first_two_steps_match_the_hand_computation(shape):
    start = torch.randn(shape, generator=_generator(1))
    grads = [torch.randn(shape, generator=_generator(2)), 3.0 * torch.randn(shape, generator=_generator(3))]
    param = torch.nn.Parameter(start.clone())
    optimizer = DMGD([param], lr=0.1, alpha=0.8, hidden=3)
    for count, grad in enumerate(grads, start=1):
        _step_with(optimizer, param, grad)
        expected = _reference_dmgd(start, grads[:count], lr=0.1, alpha=0.8, hidden=3)
        torch.testing.assert_close(param.detach(), expected, rtol=1e-6, atol=1e-7)


def test_dmgd_first_step_written_out_in_full():
    """The single step in closed form: W1 = α, W2 = −(1−α)·û·tanh(û), v = −(1−α)·û."""
    grad = torch.tensor([0.5, -2.0, 1.0, 0.0])
    param = torch.nn.Parameter(torch.zeros(4))
    _step_with(DMGD([param], lr=0.5, alpha=0.9, hidden=1), param, grad)
    key = grad / torch.sqrt(torch.tensor(5.25 / 4))
    recalled = -0.1 * key + (-0.1 * key * torch.tanh(key)) * torch.tanh(0.9 * key)
    torch.testing.assert_close(param.detach(), 0.5 * recalled)


def test_dmgd_without_hidden_units_is_normalised_heavy_ball_momentum():
    start = torch.randn(6, generator=_generator(4))
    param = torch.nn.Parameter(start.clone())
    optimizer = DMGD([param], lr=0.05, alpha=0.7, hidden=0)
    expected, velocity = start.clone(), torch.zeros(6)
    for seed in range(3):
        grad = torch.randn(6, generator=_generator(10 + seed)) * (seed + 1)
        _step_with(optimizer, param, grad)
        velocity = 0.7 * velocity - 0.3 * grad / _rms(grad)
        expected = expected + 0.05 * velocity
        torch.testing.assert_close(param.detach(), expected)
    assert set(optimizer.state[param]) == {"momentum"}


def test_dmgd_trains_its_memory_mlp():
    param = torch.nn.Parameter(torch.zeros(5))
    optimizer = DMGD([param], lr=0.1, hidden=2)
    _step_with(optimizer, param, torch.randn(5, generator=_generator(5)))
    state = optimizer.state[param]
    assert state["memory_out"].shape == (2, 5) and state["memory_out"].abs().min() > 0
    assert not torch.equal(state["memory_in"], torch.ones(2, 5))


def test_dmgd_weight_decay_shrinks_the_parameter_by_lr_times_decay():
    start = torch.randn(4, 3, generator=_generator(6))
    grad = torch.randn(4, 3, generator=_generator(7))
    plain, decayed = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    _step_with(DMGD([plain], lr=0.1, weight_decay=0.0), plain, grad)
    _step_with(DMGD([decayed], lr=0.1, weight_decay=0.5), decayed, grad)
    torch.testing.assert_close(decayed.detach() - plain.detach(), -0.05 * start)


def test_m3_on_a_vector_over_two_chunks_of_two_matches_the_hand_computation():
    lr, (b1, b2, b3), alpha, eps = 0.01, (0.9, 0.99, 0.5), 0.5, 1e-8
    g1, g2, g3 = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.5, 1.0, -1.0]), torch.tensor([-1.0, 0.0, 2.0])
    p0 = torch.tensor([0.3, -0.1, 0.2])
    param = torch.nn.Parameter(p0.clone())
    optimizer = M3([param], lr=lr, betas=(b1, b2, b3), alpha=alpha, chunk=2, eps=eps)

    m1, v = (1 - b1) * g1, (1 - b2) * g1 ** 2
    p1 = p0 - lr * m1 / (torch.sqrt(v) + eps)  # the slow momentum is still zero
    _step_with(optimizer, param, g1)
    torch.testing.assert_close(param.detach(), p1)

    m1, v = b1 * m1 + (1 - b1) * g2, b2 * v + (1 - b2) * g2 ** 2
    m2 = (1 - b3) * (g1 + g2)  # the chunk closes: its summed gradients enter the slow momentum
    p2 = p1 - lr * (m1 + alpha * m2) / (torch.sqrt(v) + eps)
    _step_with(optimizer, param, g2)
    torch.testing.assert_close(param.detach(), p2)

    m1, v = b1 * m1 + (1 - b1) * g3, b2 * v + (1 - b2) * g3 ** 2
    p3 = p2 - lr * (m1 + alpha * m2) / (torch.sqrt(v) + eps)  # the slow momentum holds until step 4
    _step_with(optimizer, param, g3)
    torch.testing.assert_close(param.detach(), p3)

    g4 = torch.tensor([2.0, 1.0, -0.5])
    m1, v = b1 * m1 + (1 - b1) * g4, b2 * v + (1 - b2) * g4 ** 2
    m2 = b3 * m2 + (1 - b3) * (g3 + g4)  # the second chunk's sum starts afresh from g3
    p4 = p3 - lr * (m1 + alpha * m2) / (torch.sqrt(v) + eps)
    _step_with(optimizer, param, g4)
    torch.testing.assert_close(param.detach(), p4)


@pytest.mark.parametrize("shape", [(6, 10), (12, 4)])
def test_newton_schulz_makes_singular_values_nearly_equal(shape):
    left, _, right = torch.linalg.svd(torch.randn(shape, generator=_generator(8)), full_matrices=False)
    matrix = left @ torch.diag(torch.linspace(1.0, 10.0, min(shape))) @ right  # condition number 10
    singular_values = torch.linalg.svdvals(newton_schulz(matrix, 5))
    assert singular_values.min() >= 0.5 and singular_values.max() <= 1.5


def test_orthogonalise_keeps_shape_and_rms_and_passes_vectors_through():
    momentum = 0.01 * torch.randn(4, 3, 2, generator=_generator(9))
    orthogonal = orthogonalise(momentum, 5)
    assert orthogonal.shape == momentum.shape
    torch.testing.assert_close(_rms(orthogonal), _rms(momentum))
    torch.testing.assert_close(orthogonal.reshape(4, 6), newton_schulz(momentum.reshape(4, 6), 5)
                               * _rms(momentum) / _rms(newton_schulz(momentum.reshape(4, 6), 5)))
    vector = torch.randn(5, generator=_generator(10))
    assert torch.equal(orthogonalise(vector, 5), vector)


def test_m3_first_step_on_a_matrix_uses_the_orthogonalised_momentum():
    start, grad = torch.randn(5, 8, generator=_generator(11)), torch.randn(5, 8, generator=_generator(12))
    param = torch.nn.Parameter(start.clone())
    _step_with(M3([param], lr=0.01, betas=(0.9, 0.999, 0.99)), param, grad)
    expected = start - 0.01 * orthogonalise(0.1 * grad, 5) / (torch.sqrt(0.001 * grad ** 2) + 1e-8)
    torch.testing.assert_close(param.detach(), expected)
    adam_without_orthogonalisation = start - 0.01 * 0.1 * grad / (torch.sqrt(0.001 * grad ** 2) + 1e-8)
    assert not torch.allclose(param.detach(), adam_without_orthogonalisation)


OPTIMIZERS = {
    "dmgd": lambda params, lr=0.03: DMGD(params, lr=lr, alpha=0.9, hidden=2, weight_decay=0.01),
    "m3": lambda params, lr=0.03: M3(params, lr=lr, chunk=2, weight_decay=0.01),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_dict_round_trip_resumes_identically(name):
    shapes = [(4, 3), (5,)]
    grads = [[torch.randn(shape, generator=_generator(20 + 3 * i + k)) for k, shape in enumerate(shapes)]
             for i in range(3)]
    original = [torch.nn.Parameter(torch.randn(shape, generator=_generator(30 + k))) for k, shape in enumerate(shapes)]
    optimizer = OPTIMIZERS[name](original)
    for step_grads in grads[:2]:
        for param, grad in zip(original, step_grads):
            param.grad = grad.clone()
        optimizer.step()

    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)  # the trainer reloads with weights_only=True
    buffer.seek(0)
    resumed = [torch.nn.Parameter(param.detach().clone()) for param in original]
    reloaded = OPTIMIZERS[name](resumed, lr=0.5)  # the saved lr must win
    reloaded.load_state_dict(torch.load(buffer, weights_only=True))
    fresh = OPTIMIZERS[name]([torch.nn.Parameter(param.detach().clone()) for param in original])

    for group in (optimizer, reloaded, fresh):
        for param, grad in zip(group.param_groups[0]["params"], grads[2]):
            param.grad = grad.clone()
        group.step()
    for param, twin, stranger in zip(original, resumed, fresh.param_groups[0]["params"]):
        assert torch.equal(param, twin)
        assert not torch.equal(param, stranger)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_learning_rate_set_between_steps_is_honoured(name):
    param = torch.nn.Parameter(torch.randn(4, 3, generator=_generator(40)))
    optimizer = OPTIMIZERS[name]([param])
    _step_with(optimizer, param, torch.randn(4, 3, generator=_generator(41)))
    moved = param.detach().clone()
    optimizer.param_groups[0]["lr"] = 0.0
    _step_with(optimizer, param, torch.randn(4, 3, generator=_generator(42)))
    assert torch.equal(param.detach(), moved)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_parameters_without_gradients_are_left_alone(name):
    used, unused = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    optimizer = OPTIMIZERS[name]([used, unused])
    _step_with(optimizer, used, torch.ones(3))
    assert torch.equal(unused.detach(), torch.ones(3)) and unused not in optimizer.state
    assert not torch.equal(used.detach(), torch.ones(3))


@pytest.mark.parametrize("make, message", [
    (lambda p: DMGD(p, lr=-1.0), "lr"),
    (lambda p: DMGD(p, alpha=1.0), "alpha"),
    (lambda p: DMGD(p, hidden=-1), "hidden"),
    (lambda p: M3(p, lr=-1.0), "lr"),
    (lambda p: M3(p, betas=(0.9, 1.0, 0.9)), "betas"),
    (lambda p: M3(p, chunk=0), "chunk"),
])
def test_bad_hyperparameters_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make([torch.nn.Parameter(torch.zeros(2))])


def test_every_bad_hyperparameter_is_reported_at_once():
    with pytest.raises(ValueError, match="lr.*alpha.*hidden"):
        DMGD([torch.nn.Parameter(torch.zeros(2))], lr=-1.0, alpha=2.0, hidden=-1)


@pytest.mark.parametrize("shape", [(10,), (10, 4)])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_minimises_a_least_squares_problem(name, shape):
    generator = _generator(50)
    rotation, _ = torch.linalg.qr(torch.randn(10, 10, generator=generator))
    matrix = rotation @ torch.diag(torch.linspace(0.5, 2.0, 10)) @ rotation.T
    target = torch.randn(shape, generator=generator)
    x = torch.nn.Parameter(torch.zeros(shape))
    optimizer = OPTIMIZERS[name]([x])

    def loss() -> torch.Tensor:
        return (matrix @ x - target).square().sum()

    start = loss().item()
    for _ in range(300):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.05 * start
