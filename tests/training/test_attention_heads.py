"""Attention heads through the family contract: every registered family's attention is recorded per head on
a probe batch, focus is 1 − entropy / log keys, and a run that probes trains exactly as one that does not."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from trimodal.training.attention_heads import AttentionProbe, attention_weights, head_focus, recorded_attention
from trimodal.training.config import featurize_line, load_config, shipped_config
from trimodal.training.data import TrimodalDataset, open_sources
from trimodal.training.models import available_models
from trimodal.training.trainer import build_from_config, train

FAMILIES = available_models()


def test_focus_is_zero_for_uniform_attention_and_one_for_a_single_key():
    uniform = torch.full((2, 1, 3, 4), 0.25)
    single = torch.zeros(2, 1, 3, 4)
    single[..., 2] = 1.0
    assert head_focus(torch.cat([uniform, single], 1)) == pytest.approx([0.0, 1.0])
    # A masked key does not count: uniform over the 2 keys left is focus 0 too.
    mask = torch.tensor([True, True, False, False])
    weights, keys = attention_weights(torch.zeros(1, 1, 2, 1), torch.zeros(1, 1, 4, 1), mask)
    assert keys.tolist() == [[[2, 2]]] and head_focus(weights, keys) == pytest.approx([0.0])
    assert head_focus(torch.tensor([[[[0.5, 0.5, 0.0, 0.0]]]])) == pytest.approx([0.5])  # 2 of 4 keys, all attendable


def test_recorded_weights_are_the_ones_scaled_dot_product_attention_used():
    attention = torch.nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(3, 5, 8)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    _, expected = attention(x, x, x, key_padding_mask=padding, need_weights=True, average_attn_weights=False)
    with torch.no_grad(), recorded_attention(attention) as records:
        out, _ = attention(x, x, x, key_padding_mask=padding, need_weights=False)
    ((weights, keys),) = records[""]
    assert keys[1, :, 0].tolist() == [3, 3]
    assert torch.allclose(weights, expected, atol=1e-6)
    assert torch.allclose(out, attention(x, x, x, key_padding_mask=padding, need_weights=False)[0])


@pytest.fixture(scope="module")
def probed(micro_shards, featurized_micro):
    cache = {}

    def get(family: str):
        if family not in cache:
            config = load_config(shipped_config(f"{family}-tiny"))
            sources = open_sources(micro_shards, featurized_micro(featurize_line(shipped_config(f"{family}-tiny"))))
            torch.manual_seed(0)
            model, _ = build_from_config(config, sources.store.config)
            batch = next(iter(TrimodalDataset(sources, split="val", batch_size=4, shuffle=False,
                                              modalities=model.modalities, inputs=model.store_inputs())))
            probe = AttentionProbe(batch, every=1)
            model.train()
            before = torch.get_rng_state()
            record = probe(model, 0, 1)
            assert torch.equal(before, torch.get_rng_state()) and model.training
            cache[family] = (model, probe, record)
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_every_familys_attention_heads_are_recorded(family, probed, tmp_path):
    model, probe, record = probed(family)
    assert record["type"] == "attention" and record["step"] == 1 and record["heads"], family
    for name, focus in record["heads"].items():
        module = model.get_submodule(name)
        heads = getattr(module, "num_heads", getattr(module, "heads", None))
        assert heads is None or len(focus) == heads, (family, name)
        assert all(0.0 <= f <= 1.0 for f in focus if f == f), (family, name, focus)
    json.dumps(record)  # a metrics.jsonl line
    if model.cross_modal_attention():
        assert set(probe.maps) <= set(model.cross_modal_attention()) and probe.maps, family
        (path,) = probe.plot(tmp_path)
        assert path.name == "cross-modal-attention.png" and path.stat().st_size > 0


def test_a_run_that_probes_trains_bit_exactly_as_one_that_does_not_and_plots_heads(micro_shards, featurized_micro,
                                                                                  tmp_path):
    config = shipped_config("dualloop-tiny")
    store = featurized_micro(featurize_line(config))
    runs = {}
    for every in (0, 1):
        run = tmp_path / f"every-{every}"
        train(config, micro_shards, store, run, overrides=["train.epochs=2", "train.batch_size=4",
                                                           "train.num_workers=0", f"train.attention_every={every}",
                                                           "model.dropout=0.1"])
        runs[every] = run
    plain, probed_weights = (load_file(str(runs[e] / "checkpoints" / "last.safetensors")) for e in (0, 1))
    assert plain.keys() == probed_weights.keys()
    assert all(torch.equal(plain[name], probed_weights[name]) for name in plain)
    records = [json.loads(line) for line in (runs[1] / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["type"] == "attention"]
    assert steps == list(range(1, len(steps) + 1)) and steps
    assert (runs[1] / "plots" / "attention-heads.png").is_file()
    assert not (runs[0] / "plots" / "attention-heads.png").exists()
