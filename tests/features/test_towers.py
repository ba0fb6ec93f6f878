"""Partial caching: a tower cut after block L and run from the states stored there gives what the whole
tower gives; the model side rebuilds the same tower (fixed-seed random init, or a local weights file)."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from trimodal.errors import ConfigError
from trimodal.features.image import parse_encoder
from trimodal.features.speech import SpeechTowerExtractor
from trimodal.features.text import OpenClipTokenizer, make_text_extractors
from trimodal.features.towers import ProjectedAttention, SpeechCut, TimmVitCut
from trimodal.training.models.cman.lora import tower_top

CPU = torch.device("cpu")
CAPTIONS = ["a red square on a blue background .", "a dog", "there is a small green star against grey sky"]


def test_projected_attention_is_multihead_attention_with_separate_projections():
    torch.manual_seed(0)
    attention = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(3, 7, 32)
    causal = torch.full((7, 7), float("-inf")).triu(1)
    expected = attention(x, x, x, need_weights=False, attn_mask=causal)[0]
    got = ProjectedAttention(attention)(x, x, x, need_weights=False, attn_mask=causal)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_text_states_cached_after_a_block_give_the_whole_towers_embedding():
    tokenizer, tower = make_text_extractors("open_clip:ViT-B-32:layer=9", CPU, tokens=True)
    ids = tokenizer(CAPTIONS)
    pooled, states = tower(ids, batch_size=2)  # batches of 2 and 1: nothing depends on the batch
    assert pooled.shape == (3, 512) and states.shape == (3, 77, 512)
    ends = ids.argmax(axis=1)
    assert all(not states[row, end + 1 :].any() and states[row, end].any() for row, end in enumerate(ends))
    # The same random tower as open_clip's own, encoded whole.
    from trimodal.features.open_clip_image import create_open_clip

    model, _ = create_open_clip(parse_encoder("open_clip:ViT-B-32"), "text", "text")
    with torch.no_grad():
        whole = model.eval().encode_text(torch.from_numpy(ids).long())
    np.testing.assert_allclose(pooled, whole.numpy(), atol=1e-4)
    # The model's top (rebuilt from the spec, attention split for LoRA) on the stored float16 states.
    top = tower_top("text", "open_clip:ViT-B-32:layer=9", adapt_blocks=3).eval()
    with torch.no_grad():
        from_cache = top(torch.from_numpy(states.astype(np.float16)).float(), torch.from_numpy(ids).long())
    np.testing.assert_allclose(from_cache.numpy(), pooled, atol=2e-2 * np.abs(pooled).max())


def test_image_states_cached_after_a_block_give_the_whole_towers_embedding():
    from trimodal.features.image import make_image_extractor

    tower = make_image_extractor("open_clip:ViT-B-32:layer=10", CPU, tokens=True)
    pixels = torch.randn(2, 3, 224, 224)
    pooled, states = tower.encode_pixels(pixels)
    assert states.shape == (2, 50, 768) and tower.attrs()["layer"] == 10
    with torch.no_grad():
        whole = tower.visual(pixels)[0] if tower.visual.output_tokens else tower.visual(pixels)
    np.testing.assert_allclose(pooled, whole.numpy(), atol=1e-4)
    top = tower_top("image", "open_clip:ViT-B-32:layer=10", adapt_blocks=2).eval()
    with torch.no_grad():
        np.testing.assert_allclose(top(torch.from_numpy(states)).numpy(), pooled, atol=1e-4)


def test_a_timm_vit_cut_after_a_block_gives_the_whole_towers_output():
    import timm

    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=224,
                              global_pool="token").eval()
    cut = TimmVitCut(model)
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        states, context = cut.embed(pixels)
        cached = cut.run_blocks(states, context, 0, 8)
        torch.testing.assert_close(cut.top(8)(cached), model(pixels), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tower", ["HUBERT_BASE", "WAVLM_BASE"])
def test_speech_frames_cached_after_a_layer_continue_exactly_in_a_padded_batch(tower):
    extractor = SpeechTowerExtractor(parse_encoder(f"torchaudio:{tower}:layer=10", ("torchaudio",)), CPU)
    waveforms = [torch.randn(16_000), torch.randn(9_000)]
    cached = extractor.batched(waveforms)
    assert [len(frames) for frames in cached] == [49, 27] and cached[0].shape[1] == 768
    # The whole tower on each utterance alone (torchaudio's own forward) ...
    model = extractor.cut
    with torch.no_grad():
        whole = [model.head(*_alone(model, w)) for w in waveforms]
    # ... equals the model-side top (rebuilt from the spec) on the cached frames, padded into one batch.
    top = tower_top("audio", f"torchaudio:{tower}:layer=10", adapt_blocks=2).eval()
    batch = torch.zeros(2, 49, 768)
    mask = torch.zeros(2, 49, dtype=torch.bool)
    for row, frames in enumerate(cached):
        batch[row, : len(frames)], mask[row, : len(frames)] = torch.from_numpy(frames), True
    with torch.no_grad():
        pooled = top(batch, mask)
    for row in range(2):
        torch.testing.assert_close(pooled[row], whole[row][0], atol=1e-4, rtol=1e-4)


def _alone(cut: SpeechCut, waveform):
    states, mask = cut.embed(waveform)
    return cut.run_blocks(states, mask), mask


def test_local_weight_files_load_and_are_recorded(tmp_path):
    """A small weights file saved from a randomly initialised tower proves the path (text and speech)."""
    import torchaudio

    from trimodal.features.open_clip_image import create_open_clip

    torch.manual_seed(1)
    model, _ = create_open_clip(parse_encoder("open_clip:ViT-B-32"), "text", "text")
    text_state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("visual.")}
    for tensor in text_state.values():
        tensor.add_(0.01)  # not the fixed-seed init
    save_file(text_state, str(tmp_path / "clip-text.safetensors"))
    spec = f"open_clip:ViT-B-32:{tmp_path / 'clip-text.safetensors'}:layer=11"
    tokenizer, tower = make_text_extractors(spec, CPU, tokens=True)
    assert not tower.random_init and len(tower.attrs()["weights_sha256"]) == 64
    ids = tokenizer(CAPTIONS[:2])
    pooled, states = tower(ids)
    top = tower_top("text", spec, adapt_blocks=1).eval()
    with torch.no_grad():
        np.testing.assert_allclose(top(torch.from_numpy(states), torch.from_numpy(ids).long()).numpy(), pooled,
                                   atol=1e-4)
    random_pooled, _ = make_text_extractors("open_clip:ViT-B-32:layer=11", CPU, tokens=True)[1](ids)
    assert not np.allclose(random_pooled, pooled)

    speech = torchaudio.models.hubert_base()
    save_file(speech.state_dict(), str(tmp_path / "hubert.safetensors"))
    loaded = SpeechTowerExtractor(parse_encoder(f"torchaudio:HUBERT_BASE:{tmp_path / 'hubert.safetensors'}",
                                                ("torchaudio",)), CPU)
    assert loaded.attrs()["weights_sha256"] and loaded.layer == 12
    save_file({"nothing": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConfigError, match="does not hold the weights of torchaudio's WAV2VEC2_BASE"):
        SpeechTowerExtractor(parse_encoder(f"torchaudio:WAV2VEC2_BASE:{tmp_path / 'bad.safetensors'}",
                                           ("torchaudio",)), CPU)


def test_tower_specs_and_their_mistakes():
    spec = parse_encoder("open_clip:ViT-B-32:/w/clip.safetensors:layer=11")
    assert (spec.weights, spec.layer, str(spec)) == ("/w/clip.safetensors", 11, "open_clip:ViT-B-32:/w/clip.safetensors:layer=11")
    with pytest.raises(ConfigError, match="unknown option depth"):
        parse_encoder("open_clip:ViT-B-32:depth=3")
    with pytest.raises(ConfigError, match="add --text-tokens"):
        make_text_extractors("open_clip:ViT-B-32:layer=3", CPU)
    with pytest.raises(ConfigError, match="--text-tokens needs a text tower"):
        make_text_extractors("auto", CPU, tokens=True)
    with pytest.raises(ConfigError, match="layer must be 0..12"):
        make_text_extractors("open_clip:ViT-B-32:layer=13", CPU, tokens=True)
    with pytest.raises(ConfigError, match="unknown speech tower 'HUBERT_HUGE'"):
        SpeechTowerExtractor(parse_encoder("torchaudio:HUBERT_HUGE", ("torchaudio",)), CPU)
    with pytest.raises(ConfigError, match="featurize with --text open_clip:ViT-B-32:layer=10 --text-tokens"):
        tower_top("text", "open_clip:ViT-B-32:layer=11", adapt_blocks=2)
    assert OpenClipTokenizer("open_clip:ViT-B-32:layer=4").spec == "open_clip:ViT-B-32"
