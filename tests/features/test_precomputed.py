"""BabyLM's DINOv2 rows imported into image/embedding by key: exact values, and clear errors for bad files."""

import json
import os

import numpy as np
import pytest

from trimodal.errors import TrimodalError
from trimodal.features.featurize import FeaturizeOptions, featurize
from trimodal.features.store import FeatureStore, StaleCacheError
from trimodal.pipeline.shard.writer import ShardOptions
from trimodal.pipeline.datasets import shard_dataset
from trimodal.pipeline.sources.babylm_mm import parse_key
from trimodal.pipeline.synthesize.babylm import write_babylm

HALVES = ("cc_3M_dino_v2_states_1of2.npy", "cc_3M_dino_v2_states_2of2.npy")


@pytest.fixture
def babylm(tmp_path):
    write_babylm(tmp_path / "data" / "babylm-mm", cc3m=300, localized_narratives=100)
    return tmp_path / "data"


def shard(root, out):
    return shard_dataset("babylm-mm", root, out, ShardOptions(max_samples=64),
                         source_options={"val_fraction": 0.1, "test_fraction": 0.1})


def test_rows_are_imported_by_key_with_their_exact_values(babylm, tmp_path):
    index = shard(babylm, tmp_path / "shards")
    summary = featurize(tmp_path / "shards", tmp_path / "f.zarr", FeaturizeOptions(device="cpu", text=None, audio=None))
    assert summary.rows == 400 and not summary.random_init
    cc3m = np.concatenate([np.load(babylm / "babylm-mm" / name) for name in HALVES])
    narratives = np.load(babylm / "babylm-mm" / "local_narr_dino_v2_states.npy")
    store = FeatureStore.open(tmp_path / "f.zarr")
    image = store.config["image"]
    assert image["model"] == "dinov2-base (BabyLM)" and image["embed_dim"] == 768
    digests = {f["file"]: f["sha256"] for files in image["files"].values() for f in files}
    assert set(digests) == set(HALVES) | {"local_narr_dino_v2_states.npy"}
    assert digests == {f["file"]: f["sha256"] for part in index["precomputed"]["image/embedding"]["parts"].values()
                       for f in part["files"]}
    seen = 0
    for slot in store.slots.values():
        part = store.read_shard(slot.name, text=False, audio=False)
        for key, row in zip(part.keys, part.image):
            name, number = parse_key(key)
            expected = (cc3m if name == "cc3m" else narratives)[number]
            np.testing.assert_array_equal(row, expected.astype(np.float16))
            seen += 1
    assert seen == 400


def test_a_row_with_nan_is_named_with_its_file_and_row(babylm, tmp_path):
    path = babylm / "babylm-mm" / HALVES[1]
    matrix = np.load(path)
    matrix[17, 0] = np.nan
    np.save(path, matrix)
    shard(babylm, tmp_path / "shards")
    with pytest.raises(TrimodalError, match=rf"{HALVES[1]}: row 17 holds NaN or inf \(sample cc3m-00000167\)"):
        featurize(tmp_path / "shards", tmp_path / "f.zarr", FeaturizeOptions(device="cpu", text=None, audio=None))


def test_a_features_file_changed_after_sharding_is_stale(babylm, tmp_path):
    shard(babylm, tmp_path / "shards")
    path = babylm / "babylm-mm" / "local_narr_dino_v2_states.npy"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    with pytest.raises(StaleCacheError, match="local_narr_dino_v2_states.npy changed since `mm shard`"):
        featurize(tmp_path / "shards", tmp_path / "f.zarr", FeaturizeOptions(device="cpu", text=None, audio=None))


def test_shards_that_do_not_match_their_features_are_refused(babylm, tmp_path):
    index = shard(babylm, tmp_path / "shards")
    index["precomputed"]["image/embedding"]["parts"].pop("localized-narratives")
    (tmp_path / "shards" / "index.json").write_text(json.dumps(index))
    with pytest.raises(TrimodalError, match="no precomputed features for part localized-narratives"):
        featurize(tmp_path / "shards", tmp_path / "f.zarr", FeaturizeOptions(device="cpu", text=None, audio=None))


def test_the_cli_imports_and_reports_the_extractor(babylm, tmp_path, mm):
    assert mm("shard", "babylm-mm", "--root", babylm, "--out", tmp_path / "shards").exit_code == 0
    result = mm("featurize", tmp_path / "shards", "--out", tmp_path / "f.zarr", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "dinov2-base (BabyLM)" in result.output and "RANDOM" not in result.output
    result = mm("featurize", tmp_path / "shards", "--out", tmp_path / "g.zarr", "--image-tokens")
    assert result.exit_code != 0 and "--image-tokens" in result.output
