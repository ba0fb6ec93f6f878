"""`mm train` and `mm eval` under torchrun: 2 ranks with gloo on the CPU, for real (each launch is a few
seconds of process start-up, so the families share one launch)."""

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.launch import mm_torchrun, one_process, ranks_of, succeeded, torchrun, wait_for

from trimodal.training.config import featurize_line, load_config, shipped_config
from trimodal.training.models import available_models, family_attribute, model_defaults

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
FAMILIES = available_models()
# Stated tolerances. The first step: the loss to 1e-5 of its value; the whole gradient (every parameter's,
# concatenated) to 1e-3 of its norm; each parameter's to 2e-2 of its own norm plus 1e-5 of the whole
# gradient's. The two sum the same numbers in other orders: the float families agree to ~1e-7 of the
# whole gradient (measured), bitmar to ~5e-4, because its 8-bit activations then round a few values to
# the neighbouring level. After a 3-step run: every weight tensor to 2e-2 of its norm, or each of its
# values to one learning rate (Adam turns tiny differences of near-zero gradients into differences of a
# step's size; measured worst: 1.5e-2 for bitmar, 1e-3 to 9e-3 for the others).
LOSS_TOLERANCE, GRADIENT_TOLERANCE, TENSOR_TOLERANCE, WEIGHT_TOLERANCE = 1e-5, 1e-3, 2e-2, 2e-2


@pytest.fixture(scope="module")
def family_runs(featurized_mini, mini_shards, tmp_path_factory):
    """Every family's first step and a 3-step run, once as 1 process × 32 rows, once as 2 ranks × 16."""
    base = tmp_path_factory.mktemp("distributed-families")
    specs = {}
    for family in FAMILIES:
        config = shipped_config(f"{family}-tiny")
        overrides = ["train.epochs=1", "train.max_steps=3", "train.batch_size=32", "train.num_workers=0",
                     "train.data_streams=2", "train.log_every=1"]
        if "dropout" in model_defaults(family):  # dropout masks depend on how rows fall on ranks
            overrides.append("model.dropout=0.0")
        if family_attribute(family, "loss_names"):  # a family that trains in stages: every loss at once
            losses = json.dumps(list(family_attribute(family, "default_losses")))
            overrides.append(f'train.stages=[{{ name = "all", epochs = 1, losses = {losses} }}]')
        specs[family] = {"config": str(config), "shards": str(mini_shards), "overrides": overrides,
                         "store": str(featurized_mini(featurize_line(config)))}
    (base / "spec.json").write_text(json.dumps(specs))
    succeeded(one_process(WORKER, "families", base / "spec.json", base / "one"))
    succeeded(torchrun(WORKER, "families", base / "spec.json", base / "two"))
    return base / "one", base / "two"


@pytest.mark.parametrize("family", FAMILIES)
def test_two_ranks_with_half_batches_give_the_first_step_of_one_process(family, family_runs):
    one, two = (torch.load(folder / family / "step.pt", weights_only=True) for folder in family_runs)
    assert one["loss"] == pytest.approx(float(two["loss"]), rel=LOSS_TOLERANCE)
    assert one["parts"].keys() == two["parts"].keys()
    assert one["grads"].keys() == two["grads"].keys() and one["grads"]
    whole = torch.cat([g.flatten() for g in one["grads"].values()])
    other = torch.cat([two["grads"][name].flatten() for name in one["grads"]])
    assert float((whole - other).norm()) <= GRADIENT_TOLERANCE * float(whole.norm()), family
    for name, gradient in one["grads"].items():
        difference = float((gradient - two["grads"][name]).norm())
        assert difference <= TENSOR_TOLERANCE * float(gradient.norm()) + 1e-5 * float(whole.norm()), (family, name)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_short_run_on_two_ranks_ends_close_to_one_process(family, family_runs):
    one, two = (load_file(str(folder / family / "run" / "checkpoints" / "last.safetensors")) for folder in family_runs)
    lr = load_config(shipped_config(f"{family}-tiny")).train.lr
    assert one.keys() == two.keys()
    for name, weights in one.items():
        if weights.is_floating_point():
            difference = weights.float() - two[name].float()
            assert (float(difference.norm()) <= WEIGHT_TOLERANCE * float(weights.float().norm())
                    or float(difference.abs().max()) <= lr), (family, name)
    resolved = (family_runs[1] / family / "run" / "config.resolved.toml").read_text()
    assert "world_size = 2" in resolved and "batch_per_rank = 16" in resolved and "batch_size = 32" in resolved
