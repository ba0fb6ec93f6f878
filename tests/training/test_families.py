"""Every registered model family, from the registry: the contract, one forward over every subset of its
modalities, training through the real trainer with an exact resume at an epoch boundary, evaluation
(with test-time training and the family's extras where it has them), and every shipped config training
one step. A family added to the registry is tested here without editing this file: it ships
`configs/<name>-tiny.toml`, whose `# featurize:` line says which store it needs."""

import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trimodal.training.config import featurize_line, load_config, shipped_config
from trimodal.training.data import TrimodalDataset, open_sources
from trimodal.training.eval_run import evaluate_run
from trimodal.training.models import available_models, family_class
from trimodal.training.models.family import MODALITIES, EmptyInputError, Family
from trimodal.training.trainer import build_from_config, train

FAMILIES = available_models()
SHIPPED = sorted(p.name for p in (Path(__file__).resolve().parents[2] / "configs").glob("*.toml"))


def _tiny(family: str) -> Path:
    return shipped_config(f"{family}-tiny")


@pytest.fixture(scope="module")
def built(featurized_mini, mini_shards):
    """family -> (its tiny model in eval mode, a batch of 6 from the store its tiny config asks for)."""
    cache = {}

    def get(family: str):
        if family not in cache:
            config = load_config(_tiny(family))
            sources = open_sources(mini_shards, featurized_mini(featurize_line(_tiny(family))))
            torch.manual_seed(0)
            model, _ = build_from_config(config, sources.store.config)
            dataset = TrimodalDataset(sources, split="val", batch_size=6, shuffle=False,
                                      modalities=model.modalities, inputs=model.store_inputs())
            cache[family] = (model.eval(), next(iter(dataset)))
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_implements_the_contract_and_ships_a_tiny_config(family):
    assert issubclass(family_class(family), Family)
    config = _tiny(family)
    assert f"# mm train configs/{family}-tiny.toml" in config.read_text()
    assert load_config(config).model_name == family


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_takes_every_non_empty_subset_of_modalities(family, built):
    model, batch = built(family)
    for size in (1, 2, 3):
        for subset in itertools.combinations(MODALITIES, size):
            keep = {k: v for k, v in batch.items() if k.split("_")[0] in subset}
            readable = [m for m in subset if m in model.modalities]
            if not readable:
                with pytest.raises(EmptyInputError):
                    model(keep)
                continue
            latents = model(keep)
            assert set(readable) <= set(latents), (family, subset)
            for modality in readable:
                assert torch.allclose(latents[modality].norm(dim=-1), torch.ones(6), atol=1e-4)
    with pytest.raises(EmptyInputError, match="at least one of image, text"):
        model({"keys": []})


@pytest.mark.parametrize("family", FAMILIES)
def test_a_modality_is_encoded_the_same_alone_or_with_others(family, built):
    model, batch = built(family)
    text_only = {k: v for k, v in batch.items() if k.startswith("text")}
    assert torch.allclose(model(batch)["text"], model(text_only)["text"], atol=1e-5)
    assert torch.allclose(model.encode("text", batch), model(text_only)["text"], atol=1e-5)


def _records(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_resumes_bit_exactly_mid_epoch_and_at_an_epoch_end_and_evaluates(family, featurized_mini, mini_shards,
                                                                                  tmp_path):
    """Stopped in the middle of epoch 1 (as a signal stops it), resumed, stopped at the end of epoch 2,
    resumed: the weights and the metrics equal an uninterrupted run's, bit for bit."""
    config = _tiny(family)
    store = featurized_mini(featurize_line(config))
    overrides = ["train.epochs=3", "train.num_workers=0", "train.log_every=1"]
    straight = train(config, mini_shards, store, tmp_path / "straight", overrides=overrides)
    steps = straight.train_steps // 3
    assert steps >= 2, "the tiny config needs two steps an epoch to stop mid-epoch"
    resumed = tmp_path / "resumed"
    stopped = train(config, mini_shards, store, resumed, overrides=overrides, stop_at_step=steps // 2)
    assert stopped.stopped.step == steps // 2 and stopped.stopped.epoch == 0
    train(config, mini_shards, store, resumed, overrides=overrides, resume=True, stop_after_epoch=1)
    train(config, mini_shards, store, resumed, overrides=overrides, resume=True)
    a = load_file(str(tmp_path / "straight" / "checkpoints" / "last.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), family
    assert _records(resumed) == _records(tmp_path / "straight")
    model = family_class(family)
    result = evaluate_run(tmp_path / "resumed", split="test", device="cpu", ttt=model.has_test_time_training, beams=1)
    assert result["directions"] and all(0 <= m["R@1"] <= m["R@10"] <= 1 for m in result["directions"].values())
    if model.has_test_time_training:
        assert result["directions_ttt"].keys() == result["directions"].keys()
    # Test-time training leaves the weights as they were trained.
    after = load_file(str(tmp_path / "resumed" / "checkpoints" / "last.safetensors"))
    assert all(torch.equal(after[k], b[k]) for k in b)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_loads_and_trains_one_step(name, featurized_micro, micro_shards, request, tmp_path):
    """On a few samples, with the store the config's `# featurize:` line asks for (random-init towers)."""
    config = shipped_config(name.removesuffix(".toml"))
    assert config.read_text().startswith(("# mm train configs/", "# featurize:")), name
    if "babylm" in name:
        shards, store = request.getfixturevalue("babylm_sources")
    else:
        shards, store = micro_shards, featurized_micro(featurize_line(config))
    result = train(config, shards, store, tmp_path / "run",
                   overrides=["train.max_steps=1", "train.epochs=1", "train.batch_size=4", "train.num_workers=0",
                              "train.eval_batch_size=8"])
    assert result.train_steps == 1
    assert (tmp_path / "run" / "checkpoints" / "last.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["cman", "dualloop", "nlmm"])  # mmn: the demo's test; bitmar: test_bitmar.py
def test_the_tiny_config_reaches_three_times_chance_in_every_direction(family, featurized_mini, mini_shards, tmp_path):
    run = tmp_path / family
    train(_tiny(family), mini_shards, featurized_mini(featurize_line(_tiny(family))), run)
    result = evaluate_run(run, split="test", device="cpu", ttt=family == "nlmm")
    assert len(result["directions"]) == 6
    for direction, metrics in result["directions"].items():
        assert metrics["R@10"] >= 3 * metrics["chance@10"], (family, direction, metrics)
    if family == "nlmm":  # the test-time adapters were restored: weights as trained
        assert len(result["directions_ttt"]) == 6 and result["ttt_settings"]["max_steps"] >= 1


def test_train_help_lists_every_family(mm):
    result = mm("train", "--help")
    assert result.exit_code == 0
    for family in FAMILIES:
        assert family in result.output, family


def test_ttt_on_a_family_without_it_names_the_ones_with_it():
    from trimodal.errors import ConfigError
    from trimodal.training.eval_run import check_ttt_options
    from trimodal.training.models import build_model, families_where

    model = build_model("dualloop", model_dim=32, latent_dim=16, image_dim=8, vocab_size=50, context_length=8, n_mels=8)
    with pytest.raises(ConfigError, match=f"'dualloop' has no test-time training; --ttt works for "
                                          f"{', '.join(families_where(lambda family: family.has_test_time_training))}"):
        check_ttt_options(model, "dualloop", {})


def test_ttt_options_of_another_family_are_refused_with_the_runs_own_settings():
    from trimodal.errors import ConfigError
    from trimodal.training.eval_run import check_ttt_options
    from trimodal.training.models import build_model

    model = build_model("nlmm", model_dim=32, latent_dim=16, image_dim=8, vocab_size=50, context_length=8, n_mels=8,
                        depth={"image": 1, "text": 1, "audio": 1})
    with pytest.raises(ConfigError, match=r"--ttt-k: 'nlmm' takes no such option; .*max_steps, eta, adapter_rank"):
        check_ttt_options(model, "nlmm", {"k": 2})


def test_a_bad_model_setting_stops_before_the_run_folder_exists(mini_shards, mini_features, tmp_path):
    from trimodal.errors import ConfigError

    with pytest.raises(ConfigError, match="fusion must be one of early, late, cross"):
        train(shipped_config("dualloop-tiny"), mini_shards, mini_features, tmp_path / "run",
              overrides=['model.fusion="mid"'])
    assert not (tmp_path / "run").exists()
