"""Every model family through the real trainer on the mini dataset: exact resume at an epoch boundary
(every level's optimizer, the controller's state, LoRA adapters), and each tiny config clearly above
chance in all six directions of `mm eval` (cman on the store its config's `# featurize:` line names)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from trimodal.training.config import shipped_config
from trimodal.training.eval_run import evaluate_run
from trimodal.training.trainer import train

COMMON = ["train.epochs=2", "train.batch_size=50", "train.warmup_steps=2", "model.model_dim=64", "model.latent_dim=32"]
QUICK = {
    "nlmm": COMMON + ['model.depth={ image = 1, text = 1, audio = 1 }', "model.adapter_rank=2",
                      'model.cms_levels=[{ name = "fast", chunk_size = 1, lr = 1e-3, optimizer = "dmgd" }, '
                      '{ name = "slow", chunk_size = 3, lr = 1e-3, optimizer = "m3" }]'],
    "dualloop": COMMON + ["model.layers=1", "model.fusion_layers=1", "model.update_frequency=2"],
    "cman": ["train.epochs=2", "train.batch_size=50", "train.warmup_steps=2", "model.fusion_dim=32",
             "model.fusion_heads=4", "model.latent_dim=32", "model.encoder_dim=32", "model.rank=2"],
}
# What each family's training records carry beyond the loss (cman: nothing; its trainer is the default).
EXTRA = {"nlmm": "levels", "dualloop": "controller", "cman": "lr"}


def _features(family: str, request):
    """The store a family's tiny config asks for (its `# featurize:` line)."""
    return request.getfixturevalue("mini_cman_features" if family == "cman" else "mini_features")


@pytest.mark.parametrize("family", sorted(QUICK))
def test_resuming_at_an_epoch_boundary_ends_with_the_same_weights(family, mini_shards, request, tmp_path):
    mini_features = _features(family, request)
    config = shipped_config(f"{family}-tiny")
    overrides = QUICK[family] + ["train.num_workers=0"]
    train(config, mini_shards, mini_features, tmp_path / "straight", overrides=overrides)
    train(config, mini_shards, mini_features, tmp_path / "resumed", overrides=overrides, stop_after_epoch=0)
    train(config, mini_shards, mini_features, tmp_path / "resumed", overrides=overrides, resume=True)
    a = load_file(str(tmp_path / "straight" / "checkpoints" / "last.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "checkpoints" / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), family
    records = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert any(EXTRA[family] in record for record in records if record["type"] == "train")


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(QUICK))
def test_the_tiny_config_reaches_three_times_chance_in_every_direction(family, mini_shards, request, tmp_path):
    run = tmp_path / family
    train(shipped_config(f"{family}-tiny"), mini_shards, _features(family, request), run)
    result = evaluate_run(run, split="test", device="cpu", ttt=family == "nlmm")
    assert len(result["directions"]) == 6
    for direction, metrics in result["directions"].items():
        assert metrics["R@10"] >= 3 * metrics["chance@10"], (family, direction, metrics)
    if family == "nlmm":  # the test-time adapters were restored: weights as trained
        assert len(result["directions_ttt"]) == 6 and result["ttt_settings"]["max_steps"] >= 1


def test_train_help_lists_every_family(mm):
    from trimodal.training.models import available_models

    result = mm("train", "--help")
    assert result.exit_code == 0
    for family in available_models():
        assert family in result.output, family


def test_ttt_on_a_family_without_it_names_the_ones_with_it(tmp_path):
    from trimodal.errors import ConfigError
    from trimodal.training.eval_run import check_ttt_options
    from trimodal.training.models import build_model

    model = build_model("dualloop", model_dim=32, latent_dim=16, image_dim=8, vocab_size=50, context_length=8, n_mels=8)
    with pytest.raises(ConfigError, match="'dualloop' has no test-time training; --ttt works for mmn, nlmm"):
        check_ttt_options(model, "dualloop", None, None)


def test_a_bad_model_setting_stops_before_the_run_folder_exists(mini_shards, mini_features, tmp_path):
    from trimodal.errors import ConfigError

    with pytest.raises(ConfigError, match="fusion must be one of early, late, cross"):
        train(shipped_config("dualloop-tiny"), mini_shards, mini_features, tmp_path / "run",
              overrides=['model.fusion="mid"'])
    assert not (tmp_path / "run").exists()
