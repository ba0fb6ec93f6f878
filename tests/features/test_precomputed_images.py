"""Text-only shards whose image vectors come precomputed: `--image auto|precomputed` without reading pixels."""

import hashlib
import io
import json
import sys
import tarfile
import types

import numpy as np
import pytest
import torch

from trimodal.errors import ConfigError, TrimodalError
from trimodal.features import featurize as featurize_module
from trimodal.features.featurize import FeaturizeOptions, featurize
from trimodal.features.image import make_image_extractor
from trimodal.features.store import FeatureStore

WIDTH = 6


def vector(key: str) -> np.ndarray:
    """The double's row for `key`: distinct per key, reproducible."""
    seed = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    return np.random.default_rng(seed).normal(size=WIDTH).astype(np.float32)


class FakePrecomputed:
    """A stand-in with PrecomputedImageFeatures' protocol; counts the keys it was asked for."""

    needs_pixels = False
    tokens = False
    random_init = False
    embed_dim = WIDTH
    asked: list[str] = []

    def __init__(self, index: dict, shards):
        self.described = index["precomputed"]["image/embedding"]

    def attrs(self) -> dict:
        return {"encoder": "precomputed", "family": "precomputed", "model": self.described["extractor"],
                "embed_dim": WIDTH, "tokens": False, "random_init": False}

    def embed_keys(self, keys: list[str]) -> np.ndarray:
        FakePrecomputed.asked += keys
        if any(key.startswith("bad") for key in keys):
            raise TrimodalError(f"sample {keys[0]}: no precomputed features")
        return np.stack([vector(key) for key in keys]) if keys else np.zeros((0, WIDTH), np.float32)


@pytest.fixture(autouse=True)
def fake_precomputed_module(monkeypatch):
    """The factory imports trimodal.features.precomputed lazily; the double stands in for it."""
    module = types.ModuleType("trimodal.features.precomputed")
    module.PrecomputedImageFeatures = FakePrecomputed
    monkeypatch.setitem(sys.modules, "trimodal.features.precomputed", module)
    FakePrecomputed.asked = []


def write_text_only_shards(root, shards: dict[str, list[list[str]]], *, precomputed: bool = True, prefix="cc3m"):
    """{shard name: [captions of each sample]} as tars of KEY.txt + KEY.json only, and their index.json."""
    root.mkdir(parents=True, exist_ok=True)
    entries, row = [], 0
    for name, samples in shards.items():
        with tarfile.open(root / name, "w") as tar:
            for captions in samples:
                key = f"{prefix}-{row:08d}"
                row += 1
                meta = {"captions": [{"id": number} for number in range(len(captions))]}
                for suffix, data in (("txt", "\n".join(captions).encode()), ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        entries.append({"name": name, "samples": len(samples), "captions": sum(map(len, samples)), "utterances": 0,
                        "sha256": hashlib.sha256((root / name).read_bytes()).hexdigest()})
    split = {"samples": sum(e["samples"] for e in entries), "captions": sum(e["captions"] for e in entries),
             "utterances": 0, "shards": entries}
    index = {"format": "trimodal-shards/1", "dataset": "text-only", "modalities": ["text"], "splits": {"train": split}}
    if precomputed:
        index["precomputed"] = {"image/embedding": {"extractor": "dinov2-base (test)", "width": WIDTH, "parts": {}}}
    (root / "index.json").write_text(json.dumps(index))
    return root


SHARDS = {"train-000000.tar": [["a dog runs", "a brown dog"], ["two cats"]], "train-000001.tar": [["a red bus"]],
          "train-000002.tar": [["the sea", "waves", "a boat"], ["a kite"]]}


@pytest.fixture
def text_only(tmp_path):
    return write_text_only_shards(tmp_path / "shards", SHARDS)


def test_auto_imports_precomputed_vectors_by_key_and_reads_no_pixels(text_only, tmp_path, monkeypatch):
    real = featurize_module.read_shard
    reads = []
    monkeypatch.setattr(featurize_module, "read_shard", lambda path, **kw: reads.append(kw) or real(path, **kw))
    summary = featurize(text_only, tmp_path / "f.zarr", FeaturizeOptions(device="cpu"))
    assert reads and all(kw == {"images": False, "audio": False} for kw in reads)
    assert summary.rows == 5 and summary.captions == 8 and not summary.random_init
    assert summary.config["image"]["family"] == "precomputed" and summary.config["audio"] is None
    store = FeatureStore.open(tmp_path / "f.zarr")
    for name in SHARDS:
        part = store.read_shard(name)
        assert np.allclose(part.image, np.stack([vector(key) for key in part.keys]), atol=1e-3)
        assert part.tokens.shape == (part.caption_offsets[-1], 77)
    assert FakePrecomputed.asked == [f"cc3m-{row:08d}" for row in range(5)]


def test_precomputed_asks_for_them_explicitly(text_only, tmp_path):
    summary = featurize(text_only, tmp_path / "f.zarr", FeaturizeOptions(device="cpu", image="precomputed", text=None))
    assert summary.config["image"]["model"] == "dinov2-base (test)" and summary.config["text"] is None


def test_precomputed_without_vectors_in_the_index_is_a_config_error(tmp_path):
    shards = write_text_only_shards(tmp_path / "shards", SHARDS, precomputed=False)
    with pytest.raises(ConfigError, match="--image precomputed: the shards in .* carry no precomputed image features"):
        featurize(shards, tmp_path / "f.zarr", FeaturizeOptions(device="cpu", image="precomputed"))


def test_image_tokens_with_precomputed_vectors_is_a_config_error(text_only, tmp_path):
    with pytest.raises(ConfigError, match="--image-tokens needs an image tower"):
        featurize(text_only, tmp_path / "f.zarr", FeaturizeOptions(device="cpu", image="auto", image_tokens=True))


def test_text_only_shards_without_vectors_featurize_text_only(tmp_path):
    shards = write_text_only_shards(tmp_path / "shards", SHARDS, precomputed=False)
    summary = featurize(shards, tmp_path / "f.zarr", FeaturizeOptions(device="cpu"))
    assert summary.config["image"] is None and summary.rows == 5 and summary.captions == 8
    part = FeatureStore.open(tmp_path / "f.zarr").read_shard("train-000002.tar")
    assert part.image is None and part.tokens.shape == (4, 77) and list(part.caption_offsets) == [0, 3, 4]


def test_a_tower_on_shards_without_images_is_a_config_error(text_only, tmp_path):
    with pytest.raises(ConfigError, match=r"--image open_clip:ViT-S-32 needs pixels, .* hold no images "
                                          r"\(modalities: text\); use --image precomputed, auto or none"):
        featurize(text_only, tmp_path / "f.zarr", FeaturizeOptions(device="cpu", image="open_clip:ViT-S-32"))


def test_a_bad_row_is_the_importers_own_error_and_earlier_shards_are_kept(tmp_path):
    shards = write_text_only_shards(tmp_path / "shards", {"train-000000.tar": [["x"]], "train-000001.tar": [["y"]]})
    index = json.loads((shards / "index.json").read_text())
    write_text_only_shards(tmp_path / "bad", {"train-000001.tar": [["y"]]}, prefix="bad")
    (shards / "train-000001.tar").write_bytes((tmp_path / "bad" / "train-000001.tar").read_bytes())
    index["splits"]["train"]["shards"][1]["sha256"] = hashlib.sha256((shards / "train-000001.tar").read_bytes()).hexdigest()
    (shards / "index.json").write_text(json.dumps(index))
    with pytest.raises(TrimodalError, match="sample bad-00000000: no precomputed features"):
        featurize(shards, tmp_path / "f.zarr", FeaturizeOptions(device="cpu", text=None))
    assert [slot.done for slot in FeatureStore.open(tmp_path / "f.zarr").slots.values()] == [True, False]


@pytest.mark.parametrize("index, expected", [
    ({"modalities": ["image", "text"]}, "open_clip"),
    ({}, "open_clip"),  # shards written before index.json listed modalities all hold images
    ({"modalities": ["text"], "precomputed": {"image/embedding": {"extractor": "x", "width": WIDTH}}}, "precomputed"),
    ({"modalities": ["text"]}, None),
])
def test_auto_follows_what_the_index_says_the_shards_hold(index, expected, monkeypatch):
    from trimodal.features import image as image_module

    monkeypatch.setitem(image_module._FAMILIES, "open_clip", lambda spec, device, tokens: spec)
    chosen = make_image_extractor("auto", torch.device("cpu"), index=index)
    family = None if chosen is None else getattr(chosen, "family", None) or chosen.attrs()["family"]
    assert family == expected
