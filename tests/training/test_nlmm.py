"""`nlmm`: CMS levels stepped on their own periods with the mean of the chunk's gradients, per-level
optimizers, the test-time adapter that is restored after every query batch, config errors."""

import copy

import pytest
import torch

from trimodal.errors import ConfigError
from trimodal.training.settings import TrainConfig
from trimodal.training.models import build_model
from trimodal.training.optimization import lr_at
from trimodal.training.models.nlmm.optimizers import DMGD
from tests.training.test_models import INPUTS, fake_batch

LEVELS = [{"name": "fast", "chunk_size": 1, "lr": 1e-2, "optimizer": "adamw"},
          {"name": "slow", "chunk_size": 4, "lr": 1e-2, "optimizer": "dmgd"}]
TRAIN = TrainConfig(lr=1e-3, warmup_steps=0, grad_clip=1e9, weight_decay=0.0)


def tiny(**settings):
    return build_model("nlmm", **{**INPUTS, "depth": {"image": 1, "text": 1, "audio": 1}, "adapter_rank": 2,
                                  "cms_levels": LEVELS, **settings})


def random_gradients(model, seed: int) -> dict[int, torch.Tensor]:
    """One step's gradients, added to what is there as backward() would; returns them by parameter id."""
    generator = torch.Generator().manual_seed(seed)
    fresh = {}
    for parameter in model.parameters():
        fresh[id(parameter)] = gradient = torch.randn(parameter.shape, generator=generator)
        parameter.grad = gradient if parameter.grad is None else parameter.grad + gradient
    return fresh


def snapshot(named) -> list[torch.Tensor]:
    return [p.detach().clone() for _, p in named]


def test_a_level_with_period_4_changes_on_steps_4_and_8_only_by_the_mean_gradient():
    model = tiny()
    optimization = model.make_optimization(TRAIN, total_steps=8)
    slow = model.level_parameters()["slow"]
    fast = model.level_parameters()["fast"]
    start = snapshot(slow)
    gradients = []
    for step in range(8):
        fresh = random_gradients(model, seed=step)
        gradients.append([fresh[id(p)] for _, p in slow])
        before_fast, before_slow = snapshot(fast), snapshot(slow)
        optimization.step(step, torch.tensor(1.0))
        slow_changed = any(not torch.equal(a, p) for a, (_, p) in zip(before_slow, slow))
        fast_changed = any(not torch.equal(a, p) for a, (_, p) in zip(before_fast, fast))
        assert fast_changed, f"the fast level did not change on step {step + 1}"
        assert slow_changed == ((step + 1) % 4 == 0), f"slow level changed={slow_changed} on step {step + 1}"
        if step == 3:
            # The reference: one DMGD step from the start with the mean of steps 1-4's gradients.
            reference = [value.clone().requires_grad_() for value in start]
            for parameter, rows in zip(reference, zip(*gradients)):
                parameter.grad = torch.stack(rows).mean(0)
            DMGD(reference, lr=1e-2 * lr_at(3, TRAIN, 8) / TRAIN.lr).step()
            for expected, (_, parameter) in zip(reference, slow):
                assert torch.allclose(parameter, expected, atol=1e-6)
    assert optimization.log_record()["levels"]["slow"]["updates"] == 2
    assert optimization.log_record()["levels"]["fast"]["updates"] == 8
    assert optimization.log_record()["levels"]["slow"]["change_norm"] > 0


def test_level_parameters_are_stepped_only_by_their_level_optimizer():
    model = tiny()
    optimization = model.make_optimization(TRAIN, total_steps=8)
    main = {id(p) for group in optimization.optimizer.param_groups for p in group["params"]}
    levels = {id(p) for named in model.level_parameters().values() for _, p in named}
    assert levels and not main & levels
    assert main | levels == {id(p) for p in model.parameters()}


def test_the_level_state_round_trips_mid_chunk():
    first, second = tiny(), tiny()
    second.load_state_dict(first.state_dict())
    a, b = first.make_optimization(TRAIN, 8), second.make_optimization(TRAIN, 8)
    for step in range(2):  # two steps into the slow level's chunk of 4
        random_gradients(first, step)
        a.step(step, torch.tensor(1.0))
    second.load_state_dict(first.state_dict())
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # as torch.save + load would: no shared tensors
    for step in range(2, 4):
        for model, optimization in ((first, a), (second, b)):
            random_gradients(model, step)
            optimization.step(step, torch.tensor(1.0))
    assert all(torch.equal(x, y) for x, y in zip(first.parameters(), second.parameters()))


def test_ttt_adapts_the_query_batch_and_restores_the_adapter():
    model = tiny(ttt_max_steps=3, ttt_eta=0.5).eval()
    with torch.no_grad():
        for parameter in model.adapters.parameters():  # a trained adapter is not zero
            parameter.normal_(0, 0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = fake_batch()
    with torch.no_grad():
        plain = model.encode("text", batch)
        adapted = model.ttt_encode("text", batch)
    assert not torch.allclose(plain, adapted, atol=1e-5)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert torch.allclose(adapted.norm(dim=-1), torch.ones(len(adapted)), atol=1e-5)


def test_ttt_with_zero_steps_is_the_plain_encoding():
    model = tiny(ttt_max_steps=0).eval()
    batch = fake_batch()
    with torch.no_grad():
        assert torch.allclose(model.encode("audio", batch), model.ttt_encode("audio", batch))


def test_bad_levels_name_the_valid_settings_at_once():
    with pytest.raises(ConfigError) as error:
        tiny(cms_levels=[{"name": "fast", "chunk_size": 0, "lr": 1e-3, "optimizer": "sgd", "speed": 1}])
    message = str(error.value)
    assert "chunk_size must be an integer ≥ 1" in message and "dmgd, adamw, m3" in message
    assert "no setting speed" in message and "name, chunk_size, lr, optimizer" in message
