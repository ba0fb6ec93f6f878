"""`mm index` and `mm search` on a run trained on the mini dataset (random-init towers): a raw query made of an
indexed item's own bytes (its caption, its jpg, its wav) lands on that item with cosine 1, which holds only if
the query went through exactly the featurizer and encoder the index did."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.search.conftest import first_sample
from trimodal.search.index import IndexOptions, build_index
from trimodal.search.searcher import search


def test_the_index_holds_every_row_of_the_split_and_the_runs_recalls(index, run):
    folder, manifest = index
    test = json.loads((run / "eval-test.json").read_text())
    assert manifest["images"] == test["images"]
    assert {m: info["rows"] for m, info in manifest["modalities"].items()} == \
        {"image": test["images"], "text": test["captions"], "audio": test["utterances"]}
    assert manifest["recalls"]["mean_recall"] == test["mean_recall"]
    assert all(info["kind"].startswith("exact") for info in manifest["modalities"].values())
    assert {path.name for path in folder.iterdir()} == {"search.json", "items.json", "image.faiss", "text.faiss",
                                                        "audio.faiss"}


def test_a_rerun_is_a_no_op(index, run):
    again = build_index(str(run), None, IndexOptions(split="test", device="cpu"))
    assert again["already_complete"] and again["fingerprint"] == index[1]["fingerprint"]


def test_an_items_own_caption_image_and_speech_find_it_with_cosine_one(searcher, mini_shards):
    found, encoder = searcher
    key, members = first_sample(mini_shards)
    caption = members["txt"].decode().splitlines()[0]
    (hit,) = search(found, encoder, "text", caption, modality="text", k=1)
    assert hit.caption == caption and hit.score == pytest.approx(1.0, abs=1e-4)
    (hit,) = search(found, encoder, "image", members["jpg"], modality="image", k=1)
    assert hit.key == key and hit.score == pytest.approx(1.0, abs=1e-4)
    wav = next(suffix for suffix in members if suffix.endswith("wav"))
    (hit,) = search(found, encoder, "audio", members[wav], modality="audio", k=1)
    assert hit.key == key and hit.score == pytest.approx(1.0, abs=1e-4)
    assert f"{key}.{wav}" in [u["member"] for u in hit.utterances]


def test_cross_modal_results_rank_as_the_index_scores_them(searcher):
    found, encoder = searcher
    results = search(found, encoder, "text", "a red circle", k=10)
    assert [r.rank for r in results] == list(range(1, 11)) and all(r.modality == "image" for r in results)
    scores = [r.score for r in results]
    assert scores == sorted(scores, reverse=True)
    vector = encoder.encode("text", "a red circle")
    images = found.index("image").reconstruct_n(0, found.index("image").ntotal)
    best = np.argsort(-(images @ vector), kind="stable")[:10]
    assert [found.items["images"][row]["key"] for row in best] == [r.key for r in results]


def test_cli_search_prints_a_table_and_json_lines(index, mm, mini_shards, tmp_path):
    folder = index[0]
    table = mm("search", folder, "--text", "a blue square", "-k", "3", "--device", "cpu")
    assert table.exit_code == 0, table.output
    assert "text query → image" in table.out and "rank" in table.out
    lines = mm("search", folder, "--text", "a blue square", "--in", "audio", "-k", "4", "--json", "--device", "cpu")
    assert lines.exit_code == 0, lines.output
    results = [json.loads(line) for line in lines.out.splitlines()]
    assert [r["rank"] for r in results] == [1, 2, 3, 4] and {r["in"] for r in results} == {"audio"}
    _, members = first_sample(mini_shards)
    (tmp_path / "query.jpg").write_bytes(members["jpg"])
    by_image = mm("search", folder, "--image", tmp_path / "query.jpg", "--json", "-k", "2", "--device", "cpu")
    assert by_image.exit_code == 0 and all(json.loads(l)["in"] == "text" for l in by_image.out.splitlines())


@pytest.mark.parametrize("args, message", [
    ([], "exactly one query"),
    (["--text", "x", "--audio", "a.wav"], "exactly one query"),
    (["--text", "x", "-k", "0"], "k must be between 1 and 1000"),
    (["--text", "   "], "the text query is empty"),
    (["--text", "x", "--in", "video"], "--in must be image, text or audio"),
    (["--image", "missing.jpg"], "cannot read the --image query"),
])
def test_cli_search_refuses_bad_queries_in_one_line(index, mm, args, message):
    result = mm("search", index[0], *args, "--device", "cpu")
    assert result.exit_code == 1 and message in result.err and "Traceback" not in result.output, result.output


def test_files_that_are_not_an_image_or_audio_are_one_line(index, mm, tmp_path):
    (tmp_path / "not.jpg").write_bytes(b"this is text")
    for flag in ("--image", "--audio"):
        result = mm("search", index[0], flag, tmp_path / "not.jpg", "--device", "cpu")
        assert result.exit_code == 1 and "cannot decode" in result.err and "Traceback" not in result.output


def test_an_unfinished_index_is_refused(index, mm, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(index[0], copy)
    (copy / "search.json").unlink()
    result = mm("search", copy, "--text", "x")
    assert result.exit_code == 1 and "not a finished search index" in result.err


def test_the_search_benchmark_prints_its_latencies_and_ratios(index):
    """benchmarks/search.py still runs to its result, at a tiny size (a smoke test, not a timing)."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    repository = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "benchmarks/search.py", "--index", str(index[0]), "--items", "500",
                             "--queries", "3", "--hnsw-sizes", "300"], cwd=repository, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for kind in ("text", "image", "audio"):
        assert re.search(rf"^search {kind}: p95 [\d.]+ ms end to end; faiss / numpy = [\d.]+", result.stdout, re.M)
    assert re.search(r"^hnsw 300: recall@10 [\d.]+, search p50", result.stdout, re.M)


def test_a_captioning_run_indexes_without_speech_and_captions_an_image_query(mini_shards, mini_features, tmp_path, mm):
    """bitmar (image and text only, a captioner): `mm search --image --caption` and the API's generated caption."""
    from fastapi.testclient import TestClient

    from tests.training.test_bitmar import SMALL
    from trimodal.search.searcher import QueryEncoder, SearchIndex
    from trimodal.search.server import create_app
    from trimodal.training.config import shipped_config
    from trimodal.training.trainer import train

    run = tmp_path / "bitmar"
    train(shipped_config("bitmar-tiny"), mini_shards, mini_features, run, overrides=SMALL + ["train.epochs=1"])
    indexed = mm("index", run, "--split", "test", "--device", "cpu")
    assert indexed.exit_code == 0, indexed.output
    assert json.loads((run / "index-test" / "search.json").read_text())["modalities"].keys() == {"image", "text"}
    _, members = first_sample(mini_shards)
    (tmp_path / "q.jpg").write_bytes(members["jpg"])
    lines = mm("search", run / "index-test", "--image", tmp_path / "q.jpg", "--caption", "--json", "-k", "2",
               "--device", "cpu")
    assert lines.exit_code == 0, lines.output
    first = json.loads(lines.out.splitlines()[0])
    assert isinstance(first["generated_caption"], str) and len(lines.out.splitlines()) == 3
    speech = mm("search", run / "index-test", "--text", "x", "--in", "audio", "--device", "cpu")
    assert speech.exit_code == 1 and "indexes image, text" in speech.err
    found = SearchIndex(run / "index-test")
    client = TestClient(create_app(found, QueryEncoder(found.manifest, "cpu")))
    answer = client.post("/api/search", files={"image": ("q.jpg", members["jpg"], "image/jpeg")}).json()
    assert answer["generated_caption"] == first["generated_caption"] and answer["in"] == "text"


def test_past_the_size_threshold_a_modality_gets_the_approximate_index(run, tmp_path, monkeypatch):
    from trimodal.search import index as index_module

    monkeypatch.setattr(index_module, "APPROXIMATE_FROM", 100)  # the test split: 60 images, 300 captions
    manifest = build_index(str(run), str(tmp_path / "auto"), IndexOptions(split="test", device="cpu"))
    kinds = {modality: info["kind"].split()[0] for modality, info in manifest["modalities"].items()}
    assert kinds == {"image": "exact", "text": "HNSW", "audio": "HNSW"}
    for modality in ("text", "audio"):  # its recall against the exact index, measured on the other modalities
        assert 0.5 <= manifest["modalities"][modality]["recall_at_10_vs_exact"] <= 1.0
        assert manifest["modalities"][modality]["recall_queries"] == 60  # the image latents
