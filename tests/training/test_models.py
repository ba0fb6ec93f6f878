"""mmn's own behaviour (memory reads, test-time writes) and the shared losses on a fixed batch; what every
family must do is tested from the registry in test_families.py."""

import pytest
import torch

from trimodal.training.losses import multimodal_infonce
from trimodal.training.models import build_model

INPUTS = dict(image_dim=24, vocab_size=100, context_length=12, n_mels=10, dropout=0.0, model_dim=32, latent_dim=16,
              heads=4)
TINY = dict(**INPUTS, layers=1, memory_slots=8, central_slots=8)


def fake_batch(size: int = 6, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(1, 100, (size, 12), generator=generator)
    text[:, 8:] = 0
    mask = torch.ones(size, 30, dtype=torch.bool)
    mask[0, 20:] = False
    return {"image": torch.randn(size, 24, generator=generator), "text": text,
            "audio": torch.randn(size, 30, 10, generator=generator), "audio_mask": mask,
            **{f"{m}_present": torch.ones(size, dtype=torch.bool) for m in ("image", "text", "audio")}}


def test_memory_reads_use_real_multi_head_attention():
    model = build_model("mmn", **TINY)
    attention = model.memories["audio"].attention
    assert isinstance(attention, torch.nn.MultiheadAttention) and attention.num_heads == 4


def test_ttt_changes_only_memory_parameters_only_in_top_k_slots_and_reset_restores():
    model = build_model("mmn", **{**TINY, "ttt_k": 2, "memory_slots": 16}).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.start_test_time_training()
    batch = fake_batch(size=1)
    state = model.encoders["text"](batch["text"]) + model.type_embedding.weight[1]
    expected = (torch.nn.functional.normalize(state, dim=-1)
                @ torch.nn.functional.normalize(model.memories["text"].slots, dim=-1).T).topk(2).indices.flatten()
    model({"text": batch["text"]})
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= {n for n in model.memory_parameters()}
    assert "memories.text.slots" in changed and "memories.image.slots" not in changed
    rows = (model.memories["text"].slots != before["memories.text.slots"]).any(dim=1).nonzero().flatten()
    assert sorted(rows.tolist()) == sorted(expected.tolist())
    model.reset_memory()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not model.test_time_training


def test_ttt_writes_nothing_while_training_or_when_off():
    model = build_model("mmn", **TINY).eval()
    before = model.memories["image"].slots.detach().clone()
    model(fake_batch())
    assert torch.equal(model.memories["image"].slots, before)


def test_training_reduces_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = build_model("mmn", **TINY)
    batch = fake_batch(size=8)
    present = {m: batch[f"{m}_present"] for m in ("image", "text", "audio")}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss, pairs = multimodal_infonce(model(batch), present, model.logit_scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert set(pairs) == {"image-text", "image-audio", "text-audio"}
    assert losses[-1] < 0.5 * losses[0]


def test_losses_skip_rows_without_both_modalities():
    latents = {m: torch.nn.functional.normalize(torch.randn(4, 8), dim=-1) for m in ("image", "text", "audio")}
    present = {"image": torch.tensor([1, 1, 1, 1], dtype=torch.bool), "text": torch.tensor([1, 1, 1, 1], dtype=torch.bool),
               "audio": torch.tensor([1, 0, 0, 0], dtype=torch.bool)}
    _, pairs = multimodal_infonce(latents, present, torch.tensor(2.0))
    assert set(pairs) == {"image-text"}


def test_unknown_model_settings_are_reported_together():
    from trimodal.errors import ConfigError

    with pytest.raises(ConfigError, match="no setting colour, size"):
        build_model("mmn", colour=1, size=2)
