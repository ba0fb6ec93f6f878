"""Every registered family's encoders exported to ONNX and run on onnxruntime against torch, on the mini
test split with random-init models: max |Δ| ≤ 1e-4 (fp32) and, in every direction, top-10 lists that
differ only by near-ties. A family added to the registry is tested here without editing this file."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from trimodal.export.graphs import TOLERANCE, check_parity, export_graph, parity_batches
from trimodal.export.runtime import feeds, session
from trimodal.training.config import featurize_line, load_config, shipped_config
from trimodal.training.data import load_split, open_sources
from trimodal.training.evaluate import DIRECTIONS, embed_split
from trimodal.training.models import available_models
from trimodal.training.settings import TrainConfig
from trimodal.training.trainer import build_from_config, max_audio_frames

FAMILIES = available_models()


@pytest.fixture(scope="module")
def exported(featurized_mini, mini_shards):
    """family -> {"model", "data", "graphs": {modality: (graph bytes, inputs, quantised, parity)}}."""
    cache = {}

    def get(family: str) -> dict:
        if family not in cache:
            config_path = shipped_config(f"{family}-tiny")
            config = load_config(config_path)
            sources = open_sources(mini_shards, featurized_mini(featurize_line(config_path)), ["test"])
            torch.manual_seed(0)
            model, _ = build_from_config(config, sources.store.config)
            model.eval()
            frames = max_audio_frames(TrainConfig(max_audio_seconds=config.train.max_audio_seconds), sources.store.config)
            data = load_split(sources, "test", config.train.modalities, frames, model.store_inputs())
            graphs = {}
            for modality in config.train.modalities:
                batches = parity_batches(data, modality)
                graph, inputs, quantised = export_graph(model, modality, batches[0])
                graphs[modality] = (graph, inputs, quantised, check_parity(model, modality, graph, batches,
                                                                           quantised=quantised))
            cache[family] = {"model": model, "data": data, "graphs": graphs}
        return cache[family]

    return get


class _Sessions:
    """`encode(modality, batch)` over in-memory graphs (what `OnnxEncoders` does over an export folder)."""

    def __init__(self, graphs: dict):
        self.sessions = {modality: session(graph) for modality, (graph, *_rest) in graphs.items()}

    def encode(self, modality: str, batch: dict) -> torch.Tensor:
        runner = self.sessions[modality]
        (latents,) = runner.run(["latent"], feeds(batch, [spec.name for spec in runner.get_inputs()]))
        return torch.from_numpy(latents)


def _top10_as_torch_ranks(torch_scores: torch.Tensor, onnx_scores: torch.Tensor) -> int:
    """How many queries' onnxruntime top-10 list is not one torch could give. Scores off by at most D
    (measured) can swap two candidates only when their torch scores are within 2·D of each other: such
    near-ties (and the mini split's repeated captions, exactly tied) may come in either order, nothing else."""
    slack = 2 * float((torch_scores - onnx_scores).abs().max()) + 1e-7
    expected = torch_scores.topk(10, dim=1).values
    found = torch_scores.gather(1, onnx_scores.topk(10, dim=1).indices)
    return int(((expected - found).abs() > slack).any(dim=1).sum())


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_every_encoder_exports_and_onnxruntime_gives_torchs_latents_and_top10_lists(family, exported):
    built = exported(family)
    model, data = built["model"], built["data"]
    for modality, (graph, inputs, quantised, parity) in built["graphs"].items():
        proto = onnx.load_from_string(graph)
        onnx.checker.check_model(proto)
        # Dynamic batch (and sequence) axes: nothing of the traced example's size is fixed in the graph.
        for spec in proto.graph.input:
            assert spec.type.tensor_type.shape.dim[0].dim_param, (family, modality, spec.name)
        assert [i["shape"][0] for i in inputs] == ["batch"] * len(inputs)
        if quantised:  # 8-bit activations: rounding flips allowed (check_parity), never more than the rule
            assert parity["max_abs_diff"] <= 1e-2 and parity["rows_beyond_tolerance"] <= 0.1 * parity["rows"]
        else:
            assert parity["max_abs_diff"] <= TOLERANCE, (family, modality, parity)
        assert parity["rows"] == min(256, {"image": len(data.keys), "text": len(data.tokens),
                                           "audio": 0 if data.mels is None else len(data.mels)}[modality])

    # Every row of the split, batched as `mm index` batches them, through torch and through onnxruntime.
    torch_latents = embed_split(model, data, torch.device("cpu"), 64)
    onnx_latents = embed_split(model, data, torch.device("cpu"), 64, encode=_Sessions(built["graphs"]).encode)
    quantised = any(q for _g, _i, q, _p in built["graphs"].values())
    for modality in torch_latents:
        difference = float((torch_latents[modality] - onnx_latents[modality]).abs().max())
        assert difference <= (1e-2 if quantised else TOLERANCE), (family, modality, difference)
    for query, candidate in DIRECTIONS:
        if query in torch_latents and candidate in torch_latents:
            torch_scores = torch_latents[query] @ torch_latents[candidate].T
            onnx_scores = onnx_latents[query] @ onnx_latents[candidate].T
            assert float((torch_scores - onnx_scores).abs().max()) <= (5e-2 if quantised else 1e-3), (family, query)
            differ = _top10_as_torch_ranks(torch_scores, onnx_scores)
            assert differ == 0, f"{family} {query}->{candidate}: {differ} top-10 lists differ beyond near-ties"


@pytest.mark.parametrize("family", FAMILIES)
def test_what_a_family_cannot_export_is_one_line_saying_why(family, exported):
    model = exported(family)["model"]
    limits = model.export_limits()
    assert all(isinstance(line, str) and "\n" not in line and "not exported" in line for line in limits)
    assert any(line.startswith("test-time training") for line in limits) == model.has_test_time_training
    assert any(line.startswith("caption generation") for line in limits) == model.generates_captions


def test_bitlinear_exports_its_ternary_weights_as_int8_codes(exported):
    if "bitmar" not in FAMILIES:
        pytest.skip("no bitmar family registered")
    graph, _inputs, quantised, _parity = exported("bitmar")["graphs"]["text"]
    assert quantised
    proto = onnx.load_from_string(graph)
    codes = [onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert codes, "no int8 initializer in the bitmar text graph"
    assert all(set(np.unique(c).tolist()) <= {-1, 0, 1} for c in codes)
