"""`mm export --format onnx`, then `mm index --onnx` and `mm search --onnx` on onnxruntime alone: the same
latents (to 1e-4) and the same results as the run's torch model; and the export's one-line errors."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import numpy as np
import pytest

from tests.search.conftest import first_sample
from trimodal.cli.main import main


@pytest.fixture(scope="module")
def export(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "export"
    printed, warned = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(warned):
        assert main(["export", str(run), "--format", "onnx", "--out", str(out)]) == 0
    (out.parent / "printed.txt").write_text(printed.getvalue() + warned.getvalue())
    return out


def test_mm_export_prints_the_parity_table_and_what_is_not_exported(export):
    printed = (export.parent / "printed.txt").read_text()
    assert "max |Δ| vs torch" in printed and "test-time training" in printed


@pytest.fixture(scope="module")
def onnx_index(run, export, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx-index") / "index"
    assert main(["index", str(run), "--onnx", str(export), "--out", str(out), "--device", "cpu"]) == 0
    return out


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_the_export_holds_a_graph_per_encoder_and_a_manifest_of_inputs_and_preprocessing(export, run):
    manifest = json.loads((export / "export.json").read_text())
    assert manifest["format"] == "trimodal-onnx/1" and manifest["family"] == "mmn"
    assert set(manifest["encoders"]) == {"image", "text", "audio"}
    assert {p.name for p in export.iterdir()} == {"export.json", "image.onnx", "text.onnx", "audio.onnx"}
    for modality, graph in manifest["encoders"].items():
        assert graph["output"] == {"name": "latent", "dtype": "float32", "shape": ["batch", graph["output"]["shape"][1]]}
        assert all(spec["shape"][0] == "batch" for spec in graph["inputs"])
        assert graph["parity"]["max_abs_diff"] <= 1e-4 and graph["parity"]["rows"] > 0
        assert graph["preprocessing"]["featurizer"], modality
    audio = {spec["name"]: spec["shape"] for spec in manifest["encoders"]["audio"]["inputs"]}
    assert audio["audio"][:2] == ["batch", "frames"] and audio["audio_mask"] == ["batch", "frames"]
    assert {spec["name"]: spec["shape"] for spec in manifest["encoders"]["text"]["inputs"]}["text"] == \
        ["batch", "text_length"]
    # mmn adapts at test time (mm eval --ttt): that is not exported, and said in one line.
    assert len(manifest["not_exported"]) == 1 and manifest["not_exported"][0].startswith("test-time training")


def test_an_index_built_on_onnxruntime_holds_the_torch_indexs_vectors(onnx_index, index):
    from trimodal.search.searcher import SearchIndex

    torch_index, onnx_found = SearchIndex(index[0]), SearchIndex(onnx_index)
    assert onnx_found.manifest["encoded_with"]["runtime"] == "onnxruntime"
    assert torch_index.manifest["encoded_with"] == {"runtime": "torch"}
    for modality in ("image", "text", "audio"):
        a, b = torch_index.index(modality), onnx_found.index(modality)
        assert a.ntotal == b.ntotal
        difference = np.abs(a.reconstruct_n(0, a.ntotal) - b.reconstruct_n(0, b.ntotal)).max()
        assert difference <= 1e-4, (modality, difference)


def test_search_with_onnx_gives_the_torch_results_for_text_image_and_speech(onnx_index, index, export, mini_shards,
                                                                            tmp_path, capsys):
    _key, members = first_sample(mini_shards)
    (tmp_path / "q.jpg").write_bytes(members["jpg"])
    wav = next(suffix for suffix in members if suffix.endswith("wav"))
    (tmp_path / "q.wav").write_bytes(members[wav])
    for query in (["--text", "a red circle"], ["--image", str(tmp_path / "q.jpg"), "--in", "image"],
                  ["--audio", str(tmp_path / "q.wav"), "--in", "text"]):
        assert main(["search", str(index[0]), *query, "-k", "10", "--json", "--device", "cpu"]) == 0
        expected = _json_lines(capsys.readouterr().out)
        assert main(["search", str(onnx_index), *query, "-k", "10", "--json", "--onnx", str(export)]) == 0
        found = _json_lines(capsys.readouterr().out)
        assert [(r["key"], r["caption"]) for r in found] == [(r["key"], r["caption"]) for r in expected], query
        assert np.allclose([r["score"] for r in found], [r["score"] for r in expected], atol=1e-4)


def test_export_errors_are_one_line(run, export, index, mini_shards, tmp_path, capsys):
    assert main(["export", str(run), "--format", "tflite", "--out", str(tmp_path / "x")]) != 0
    assert "--format must be onnx" in capsys.readouterr().err
    assert main(["search", str(index[0]), "--text", "a dog", "--onnx", str(tmp_path / "nowhere")]) != 0
    error = capsys.readouterr().err
    assert "is not a finished export" in error and "Traceback" not in error
    other = tmp_path / "other"
    shutil.copytree(export, other)
    manifest = json.loads((other / "export.json").read_text())
    manifest["checkpoint_sha256"] = "0" * 64
    (other / "export.json").write_text(json.dumps(manifest))
    assert main(["search", str(index[0]), "--text", "a dog", "--onnx", str(other)]) != 0
    assert "not of the run" in capsys.readouterr().err
    assert main(["index", str(run), "--onnx", str(other), "--out", str(tmp_path / "i")]) != 0
    assert "not of the run" in capsys.readouterr().err
    assert not (tmp_path / "i" / "search.json").exists()
    _key, members = first_sample(mini_shards)
    (tmp_path / "q.jpg").write_bytes(members["jpg"])
    assert main(["search", str(index[0]), "--image", str(tmp_path / "q.jpg"), "--caption", "--onnx", str(export)]) != 0
    assert "does not generate captions" in capsys.readouterr().err


def test_an_export_cut_short_does_not_look_complete(run, tmp_path, monkeypatch, capsys):
    from trimodal.export import graphs

    def broken(*args, **kwargs):
        raise graphs.TrimodalError("the text encoder of this MMN could not be exported to ONNX: injected")

    real = graphs.export_graph
    monkeypatch.setattr(graphs, "export_graph", lambda model, modality, example: (
        broken() if modality == "text" else real(model, modality, example)))
    out = tmp_path / "cut"
    assert main(["export", str(run), "--out", str(out)]) != 0
    assert "could not be exported to ONNX: injected" in capsys.readouterr().err
    assert not (out / "export.json").exists()
    assert main(["search", str(run), "--text", "a dog", "--onnx", str(out)]) != 0
