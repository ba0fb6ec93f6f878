"""A run trained on the mini dataset (random-init towers), evaluated and indexed once per session, for the
search tests."""

from __future__ import annotations

import json

import pytest

from trimodal.pipeline.read.shards import iter_samples
from trimodal.search.index import IndexOptions, build_index
from trimodal.search.searcher import QueryEncoder, SearchIndex


@pytest.fixture(scope="session")
def run(mini_shards, mini_features, tmp_path_factory):
    from trimodal.cli.main import main

    out = tmp_path_factory.mktemp("search") / "run"
    assert main(["train", "configs/mmn-tiny.toml", "--shards", str(mini_shards), "--features", str(mini_features),
                 "--out", str(out), "train.epochs=1", "train.num_workers=0", 'train.device="cpu"']) == 0
    assert main(["eval", str(out), "--split", "test", "--device", "cpu"]) == 0
    return out


@pytest.fixture(scope="session")
def index(run):
    manifest = build_index(str(run), None, IndexOptions(split="test", device="cpu"))
    return run / "index-test", manifest


@pytest.fixture(scope="session")
def searcher(index):
    found = SearchIndex(index[0])
    return found, QueryEncoder(found.manifest, "cpu")


def first_sample(shards, split="test"):
    """(key, {suffix: bytes}) of the first sample of `split`: its captions, jpg and wavs."""
    entry = json.loads((shards / "index.json").read_text())["splits"][split]["shards"][0]
    return next(iter_samples(shards / entry["name"], {"txt", "jpg", "wav"}))
