import io
import itertools

import pytest
import torch

from trimodal.errors import ConfigError
from trimodal.training.settings import TrainConfig
from trimodal.training.models.dualloop.controller import ControlledOptimization
from trimodal.training.losses import multimodal_infonce
from trimodal.training.models import build_model
from trimodal.training.optimization import lr_at

MODALITIES = ("image", "text", "audio")
SUBSETS = [s for r in (1, 2, 3) for s in itertools.combinations(MODALITIES, r)]
FUSIONS = ("early", "late", "cross")
SMALL = dict(model_dim=32, latent_dim=16, heads=4, layers=1, fusion_layers=1, fusion_tokens=4, image_dim=24,
             vocab_size=100, context_length=12, n_mels=10, dropout=0.0)
TEXT_LENGTHS = (8, 5, 12, 3, 7, 9)
AUDIO_LENGTHS = (30, 20, 13, 27, 9, 30)


def small_model(**settings):
    torch.manual_seed(0)
    return build_model("dualloop", **{**SMALL, **settings})


def fake_batch(size: int = 6, seed: int = 0) -> dict:
    """Captions and utterances of different lengths; the padding of the utterances is noise, which no
    encoding may depend on."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(1, 100, (size, 12), generator=generator)
    mask = torch.zeros(size, 30, dtype=torch.bool)
    for row in range(size):
        text[row, TEXT_LENGTHS[row]:] = 0
        mask[row, : AUDIO_LENGTHS[row]] = True
    return {"image": torch.randn(size, 24, generator=generator), "text": text,
            "audio": torch.randn(size, 30, 10, generator=generator), "audio_mask": mask,
            **{f"{m}_present": torch.ones(size, dtype=torch.bool) for m in MODALITIES}}


def only(batch: dict, modalities) -> dict:
    return {k: v for k, v in batch.items() if k.split("_")[0] in modalities}


def row(batch: dict, index: int) -> dict:
    """One sample as a batch of one, trimmed of its padding as the loader would give it alone."""
    single = {k: v[index : index + 1] for k, v in batch.items()}
    frames = AUDIO_LENGTHS[index]
    single["audio"], single["audio_mask"] = single["audio"][:, :frames], single["audio_mask"][:, :frames]
    single["text"] = single["text"][:, : TEXT_LENGTHS[index]]
    return single


def presence(batch: dict) -> dict:
    return {m: batch[f"{m}_present"] for m in MODALITIES if m in batch}


def controlled(model, *, lr: float = 1e-3, total_steps: int = 1000) -> ControlledOptimization:
    return model.make_optimization(TrainConfig(lr=lr, warmup_steps=2), total_steps)


def run_windows(optimization: ControlledOptimization, losses, start_step: int = 0) -> int:
    """Feed one loss per optimizer step (gradient norm 1); returns the last step number."""
    step = start_step
    for loss in losses:
        step += 1
        optimization.after_step(step, torch.tensor(float(loss)), torch.tensor(1.0))
    return step


# -- the fusion network ------------------------------------------------------------------------------

@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("subset", SUBSETS)
def test_forward_and_encode_take_every_non_empty_subset_of_modalities(fusion, subset):
    model = small_model(fusion=fusion).eval()
    batch = only(fake_batch(), subset)
    latents = model(batch)
    assert sorted(latents) == sorted([*subset, "fused"])
    for latent in latents.values():
        assert latent.shape == (6, 16) and torch.allclose(latent.norm(dim=-1), torch.ones(6), atol=1e-5)
    for modality in subset:
        assert torch.allclose(model.encode(modality, batch), latents[modality], atol=1e-6)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_an_item_is_encoded_the_same_alone_or_in_a_batch_with_other_modalities(fusion):
    model = small_model(fusion=fusion).eval()
    batch = fake_batch()
    together = model(batch)
    for modality in MODALITIES:
        assert torch.allclose(model.encode(modality, only(batch, [modality])), together[modality], atol=1e-5)
        for index in (0, 2, 4):
            alone = model.encode(modality, only(row(batch, index), [modality]))
            assert torch.allclose(alone[0], together[modality][index], atol=1e-5), (modality, index)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_a_fused_row_uses_only_the_modalities_it_has(fusion):
    model = small_model(fusion=fusion).eval()
    batch = fake_batch()
    batch["text_present"] = torch.tensor([False, True, True, True, True, True])
    batch["text"][0] = 0  # as the loader pads a missing caption
    fused = model(batch)["fused"]
    assert torch.allclose(fused[0], model(only(batch, ["image", "audio"]))["fused"][0], atol=1e-5)
    assert not torch.allclose(fused[1], model(only(batch, ["image", "audio"]))["fused"][1], atol=1e-3)


def test_the_training_loss_adds_the_fused_terms():
    model = small_model(fused_weight=0.5)
    batch = fake_batch()
    latents = model(batch)
    total, parts = model.training_loss(latents, presence(batch))
    infonce, pairs = multimodal_infonce({m: latents[m] for m in MODALITIES}, presence(batch), model.logit_scale)
    fused = [parts[f"fused-{m}"] for m in MODALITIES]
    assert set(parts) == {*pairs, "fused-image", "fused-text", "fused-audio"}
    assert torch.allclose(total, infonce + 0.5 * sum(fused) / 3)
    total.backward()
    assert model.fusion.joint.layers[0].linear1.weight.grad is not None


def test_a_modality_in_fewer_than_two_rows_has_no_fused_term():
    model = small_model()
    batch = fake_batch()
    batch["audio_present"] = torch.tensor([True, False, False, False, False, False])
    _, parts = model.training_loss(model(batch), presence(batch))
    assert "fused-audio" not in parts and {"fused-image", "fused-text"} <= set(parts)


def test_a_bad_fusion_is_a_config_error_naming_the_valid_ones():
    with pytest.raises(ConfigError, match="fusion must be one of early, late, cross \\(got 'mid'\\)"):
        build_model("dualloop", fusion="mid")


# -- the learning-rate controller ----------------------------------------------------------------------

def test_the_main_optimizer_steps_everything_but_the_controller():
    model = small_model()
    optimization = controlled(model)
    stepped = {id(p) for group in optimization.optimizer.param_groups for p in group["params"]}
    controller = {id(p) for p in model.controller.parameters()}
    assert not stepped & controller
    assert stepped | controller == {id(p) for p in model.parameters()}


def test_the_multiplier_scales_the_learning_rate():
    model = small_model()
    optimization = controlled(model, total_steps=100)
    optimization.multiplier = 2.5
    batch = fake_batch()
    loss, _ = model.training_loss(model(batch), presence(batch))
    loss.backward()
    optimization.step(10, loss)
    expected = lr_at(10, optimization.train, 100) * 2.5
    assert optimization.lr == pytest.approx(expected)
    assert all(group["lr"] == pytest.approx(expected) for group in optimization.optimizer.param_groups)


def test_the_multiplier_stays_within_its_bounds():
    model = small_model(update_frequency=1, lr_multiplier_min=0.5, lr_multiplier_max=2.0, exploration=1.0)
    optimization = controlled(model)
    chosen = []
    for step in range(1, 51):
        optimization.after_step(step, torch.tensor(2.0 - step / 100), torch.tensor(1.0))
        chosen.append(optimization.multiplier)
    assert all(0.5 <= m <= 2.0 for m in chosen)
    assert 0.5 in chosen and 2.0 in chosen and len(set(chosen)) > 10  # wide exploration, clamped


def test_the_controller_learns_from_its_rewards_alone():
    model = small_model(update_frequency=2)
    optimization = controlled(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run_windows(optimization, [3.0, 3.0, 2.8, 2.7, 2.5, 2.6, 2.2, 2.0])
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("controller.") for n in changed)
    assert optimization.windows == 4 and optimization.last_reward == pytest.approx((2.55 - 2.1) / 2.55)


def test_the_controller_learns_to_raise_a_multiplier_that_always_pays():
    torch.manual_seed(0)
    model = build_model("dualloop", **{**SMALL, "update_frequency": 1, "exploration": 0.3})
    optimization = controlled(model)
    loss, chosen = 1.0, []
    for step in range(1, 301):
        chosen.append(optimization.multiplier)
        loss *= 1 - 0.001 * optimization.multiplier  # the bigger the multiplier, the bigger the reward
        optimization.after_step(step, torch.tensor(loss), torch.tensor(1.0))
    start, end = sum(chosen[:10]) / 10, sum(chosen[-50:]) / 50
    assert end > 1.5 * start and end > 3.0, (start, end)


def test_a_state_dict_round_trip_gives_the_same_next_multiplier():
    model = small_model(update_frequency=3)
    optimization = controlled(model)
    step = run_windows(optimization, [3.0, 2.9, 2.7, 2.6, 2.4, 2.5, 2.2, 2.1])  # ends mid-window
    optimization.end_epoch(0.3)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(optimization.state_dict(), buffer)
    rng = torch.get_rng_state()
    run_windows(optimization, [2.0, 1.9, 1.8, 1.6], start_step=step)

    resumed_model = small_model(update_frequency=3)
    resumed_model.load_state_dict(weights)
    resumed = controlled(resumed_model)
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    torch.set_rng_state(rng)
    run_windows(resumed, [2.0, 1.9, 1.8, 1.6], start_step=step)
    assert resumed.multiplier == optimization.multiplier
    assert resumed.log_record() == optimization.log_record()
    assert all(torch.equal(p, q) for p, q in zip(resumed_model.controller.parameters(), model.controller.parameters()))


def test_the_validation_recall_is_an_input_of_the_next_window():
    optimization = controlled(small_model(update_frequency=1))
    optimization.end_epoch(0.42)
    run_windows(optimization, [2.0])
    assert optimization.action["features"][3].item() == pytest.approx(0.42)
    optimization.end_epoch(None)
    run_windows(optimization, [1.9], start_step=1)
    assert optimization.action["features"][3].item() == 0.0


def test_the_log_record_reports_the_controller():
    optimization = controlled(small_model(update_frequency=1))
    run_windows(optimization, [2.0, 1.5])
    record = optimization.log_record()["controller"]
    assert set(record) == {"lr_multiplier", "reward", "baseline", "windows"}
    assert record["windows"] == 2 and record["reward"] == pytest.approx(0.25)
    assert record["baseline"] == pytest.approx(0.025)


def test_a_resumed_run_ends_with_the_same_weights_and_multiplier(mini_shards, mini_features, tmp_path):
    from safetensors.torch import load_file

    from trimodal.training.config import shipped_config
    from trimodal.training.trainer import train

    quick = ["train.epochs=2", "train.num_workers=0", "train.batch_size=50", "train.warmup_steps=2",
             "model.layers=1", "model.model_dim=32", "model.latent_dim=16", "model.update_frequency=1",
             "model.exploration=0.5"]
    config = shipped_config("dualloop-tiny")
    train(config, mini_shards, mini_features, tmp_path / "straight", overrides=quick)
    train(config, mini_shards, mini_features, tmp_path / "resumed", overrides=quick, stop_after_epoch=0)
    train(config, mini_shards, mini_features, tmp_path / "resumed", overrides=quick, resume=True)
    a = load_file(str(tmp_path / "straight" / "checkpoints" / "last.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "checkpoints" / "last.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("controller.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    straight, resumed = (torch.load(tmp_path / run / "checkpoints" / "last.state.pt", weights_only=True)["optimization"]
                         for run in ("straight", "resumed"))
    assert straight["controller"]["multiplier"] == resumed["controller"]["multiplier"] != 1.0
