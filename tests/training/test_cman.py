"""`cman`: LoRA adapters are the only trainable tower parameters, the fusion transformer takes any subset
of modalities, the loss choices, and what the model reads from the store."""

import itertools

import pytest
import torch

from trimodal.errors import ConfigError
from trimodal.training.settings import TrainConfig
from trimodal.training.losses import multimodal_max_margin
from trimodal.training.models import build_model, parameter_counts
from trimodal.training.optimization import Optimization

SMALL = dict(image_dim=16, vocab_size=50, context_length=8, n_mels=8, fusion_dim=32, fusion_heads=4, fusion_layers=1,
             latent_dim=16, encoder_dim=32, encoder_layers=1, dropout=0.0, adapt_blocks=0)


def _batch(rows: int = 3, frames: int = 12) -> dict:
    torch.manual_seed(0)
    text = torch.randint(1, 50, (rows, 8))
    return {"image": torch.randn(rows, 16), "image_present": torch.ones(rows, dtype=torch.bool),
            "text": text, "text_present": torch.ones(rows, dtype=torch.bool),
            "audio": torch.randn(rows, frames, 8), "audio_mask": torch.ones(rows, frames, dtype=torch.bool),
            "audio_present": torch.ones(rows, dtype=torch.bool)}


def test_the_fusion_takes_every_subset_of_modalities():
    model = build_model("cman", **SMALL).eval()
    batch = _batch()
    for size in (1, 2, 3):
        for subset in itertools.combinations(("image", "text", "audio"), size):
            fused = model.encode_subset(batch, list(subset))
            assert fused.shape == (3, 16) and torch.isfinite(fused).all()
            torch.testing.assert_close(fused.norm(dim=-1), torch.ones(3))
    # A modality alone is its own summary token's output; fused with others it differs.
    alone = model.encode("image", batch)
    assert not torch.allclose(alone, model.encode_subset(batch, ["image", "text"]))
    # Cached speech-tower frames become fusion tokens under their mask: two padded frames change nothing.
    frames = build_model("cman", **SMALL, audio_tower="torchaudio:HUBERT_BASE").eval()
    padded = dict(batch, audio=torch.cat([batch["audio"], torch.randn(3, 2, 8)], 1),
                  audio_mask=torch.cat([batch["audio_mask"], torch.zeros(3, 2, dtype=torch.bool)], 1))
    for subset in (["audio"], ["text", "audio"]):
        torch.testing.assert_close(frames.encode_subset(padded, subset), frames.encode_subset(batch, subset),
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="at least one modality"):
        model.encode_subset(batch, [])


def test_gradients_reach_every_modality_of_a_fused_subset():
    model = build_model("cman", **SMALL)
    model.encode_subset(_batch(), ["image", "text", "audio"]).sum().backward()
    for modality in ("image", "text", "audio"):
        assert model.inputs[modality].summary[1].weight.grad.abs().sum() > 0, modality


def test_the_max_margin_loss_over_every_pair_and_the_other_choices():
    model = build_model("cman", **SMALL, max_violation=False)
    latents = model(_batch(4))
    present = {m: torch.ones(4, dtype=torch.bool) for m in latents}
    loss, pairs = model.training_loss(latents, present)
    expected, _ = multimodal_max_margin(latents, present, 0.2, max_violation=False)
    torch.testing.assert_close(loss, expected)
    assert set(pairs) == {"image-text", "image-audio", "text-audio"}
    infonce = build_model("cman", **SMALL, loss="infonce")
    assert torch.isfinite(infonce.training_loss(infonce(_batch(4)), present)[0])
    fused = build_model("cman", **SMALL, fused_weight=0.5).train()
    loss, pairs = fused.training_loss(fused(_batch(4)), present)
    assert {"fused-image", "fused-text", "fused-audio"} <= set(pairs)
    with pytest.raises(ConfigError, match="loss must be one of max_margin, infonce"):
        build_model("cman", **SMALL, loss="triplet")


def test_lora_parameters_are_the_only_trainable_tower_parameters():
    model = build_model("cman", **{**SMALL, "image_dim": 512, "text_dim": 512, "adapt_blocks": 1}, rank=4,
                        image_tower="open_clip:ViT-B-32:layer=11", text_tower="open_clip:ViT-B-32:layer=11")
    assert model.store_inputs() == {"image": "tokens", "text": "states"}
    for modality in ("image", "text"):
        top = model.inputs[modality].top
        trainable = [n for n, p in top.named_parameters() if p.requires_grad]
        frozen = [n for n, p in top.named_parameters() if not p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable), modality
        assert any(n.endswith("mlp.c_fc.weight") for n in frozen) and any("q_proj.base_layer" in n for n in frozen)
        assert sorted(top.lora_targets) == ["k_proj", "out_proj", "q_proj", "v_proj"]
        # rank 4 on q, k, v and out of one 768- or 512-wide block: 4 projections x 2 x 4 x width
        width = 768 if modality == "image" else 512
        assert sum(top.get_parameter(n).numel() for n in trainable) == 4 * 2 * 4 * width
    total, trainable = parameter_counts(model)
    assert trainable < total / 5

    batch = {"image_tokens": torch.randn(2, 50, 768), "image_present": torch.ones(2, dtype=torch.bool),
             "text": torch.tensor([[49406, 320, 1929, 49407, 0, 0], [49406, 320, 49407, 0, 0, 0]]),
             "text_states": torch.randn(2, 4, 512), "text_present": torch.ones(2, dtype=torch.bool)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimization = Optimization(model, TrainConfig(lr=1e-2, warmup_steps=1), total_steps=10)
    latents = model(batch)
    loss, _ = model.training_loss(latents, {m: batch[f"{m}_present"] for m in latents})
    loss.backward()
    optimization.step(0, loss)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    tower_changed = {n for n in changed if n.startswith(("inputs.image.top", "inputs.text.top"))}
    assert tower_changed and all("lora_" in n for n in tower_changed)


def test_adapted_blocks_need_tower_states_in_the_store():
    with pytest.raises(ConfigError, match="the store has no text tower states; featurize with --text open_clip"):
        build_model("cman", **{**SMALL, "adapt_blocks": 1}, image_tower="open_clip:ViT-B-32:layer=11")


def test_cached_embeddings_only_with_no_adapted_blocks():
    model = build_model("cman", **{**SMALL, "text_dim": 24}, image_tower="open_clip:ViT-B-32:layer=11",
                        text_tower="open_clip:ViT-B-32")
    assert model.store_inputs() == {"image": "embedding", "text": "embedding"}
    assert all(model.inputs[m].top is None for m in ("image", "text", "audio"))
    batch = dict(_batch(), text_embedding=torch.randn(3, 24))
    assert model(batch)["text"].shape == (3, 16)
