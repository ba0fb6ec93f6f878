"""babylm-mm: text-only shards split by a seeded, recorded row split; feature files checked from their headers."""

import json
import shutil
import tarfile

import numpy as np
import pytest

from trimodal.errors import DatasetLayoutError, DownloadError, ShardError
from trimodal.pipeline.download import osf
from trimodal.pipeline.base.npyfiles import FeatureFileError
from trimodal.pipeline.shard.writer import ShardOptions
from trimodal.pipeline.datasets import shard_dataset
from trimodal.pipeline.sources.babylm_mm import parse_key, row_key
from trimodal.pipeline.synthesize.babylm import write_babylm
from trimodal.pipeline.datasets import validate_dataset

CC_FILES = ("cc_3M_dino_v2_states_1of2.npy", "cc_3M_dino_v2_states_2of2.npy")


@pytest.fixture
def babylm(tmp_path):
    write_babylm(tmp_path / "babylm-mm", cc3m=600, localized_narratives=200)
    return tmp_path


def shard(root, out, **options):
    fractions = {k: options.pop(k) for k in ("val_fraction", "test_fraction") if k in options}
    return shard_dataset("babylm-mm", root, out, ShardOptions(**{"max_samples": 100, **options}),
                         source_options=fractions)


def members(path):
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def test_every_caption_becomes_one_text_only_sample_keyed_by_part_and_row(babylm, tmp_path):
    index = shard(babylm, tmp_path / "out")
    assert index["modalities"] == ["text"]
    assert sum(info["samples"] for info in index["splits"].values()) == 800
    captions = json.loads((babylm / "babylm-mm" / "cc_3M_captions.json").read_text())
    name, data = members(tmp_path / "out" / index["splits"]["train"]["shards"][0]["name"])[0:2][0]
    key = name.split(".")[0]
    part, row = parse_key(key)
    assert key == row_key(part, row) and part == "cc3m"
    all_members = [m for split in index["splits"].values() for s in split["shards"]
                   for m in members(tmp_path / "out" / s["name"])]
    assert {name.split(".", 1)[1] for name, _ in all_members} == {"txt", "json"}
    text = dict(all_members)[f"{key}.txt"].decode()
    assert text == captions[row] + "\n"
    meta = json.loads(dict(all_members)[f"{key}.json"])
    assert meta["meta"] == {"part": "cc3m", "row": row} and meta["captions"][0]["text"] == captions[row]


def test_split_is_seeded_recorded_and_deterministic(babylm, tmp_path):
    first = shard(babylm, tmp_path / "a", val_fraction=0.05, test_fraction=0.05)
    again = shard(babylm, tmp_path / "b", val_fraction=0.05, test_fraction=0.05)
    other = shard(babylm, tmp_path / "c", val_fraction=0.05, test_fraction=0.05, seed=1)
    digests = lambda index: [s["sha256"] for split in index["splits"].values() for s in split["shards"]]  # noqa: E731
    assert digests(first) == digests(again) != digests(other)
    recorded = json.loads((tmp_path / "a" / "splits.json").read_text())
    assert recorded["rule"]["seed"] == 0 and recorded["rule"]["val_fraction"] == 0.05
    val_rows = recorded["parts"]["cc3m"]["val"] + recorded["parts"]["localized-narratives"]["val"]
    assert len(val_rows) == first["splits"]["val"]["samples"] and 10 <= len(val_rows) <= 80
    val_keys = [key for s in first["splits"]["val"]["shards"] for key in (s["first_key"], s["last_key"])]
    assert parse_key(val_keys[0]) == ("cc3m", recorded["parts"]["cc3m"]["val"][0])
    # Rows keep their order inside each split (the features are then read in file order).
    train_first = [parse_key(s["first_key"]) for s in first["splits"]["train"]["shards"]]
    assert train_first == sorted(train_first, key=lambda pr: (pr[0] != "cc3m", pr[1]))


def test_rerun_rewrites_only_the_missing_shard(babylm, tmp_path):
    index = shard(babylm, tmp_path / "out")
    victim = index["splits"]["train"]["shards"][2]["name"]
    before = (tmp_path / "out" / victim).read_bytes()
    (tmp_path / "out" / victim).unlink()
    untouched = tmp_path / "out" / index["splits"]["train"]["shards"][0]["name"]
    stamp = untouched.stat().st_mtime_ns
    again = shard(babylm, tmp_path / "out")
    assert again == index
    assert (tmp_path / "out" / victim).read_bytes() == before and untouched.stat().st_mtime_ns == stamp


def test_rows_not_matching_captions_is_an_error_naming_the_files(babylm, tmp_path):
    path = babylm / "babylm-mm" / CC_FILES[1]
    np.save(path, np.load(path)[:-3])
    with pytest.raises(ShardError, match=r"600 captions but .*cc_3M_dino_v2_states_2of2.npy hold 597 rows"):
        shard(babylm, tmp_path / "out")
    assert not (tmp_path / "out" / "index.json").exists()
    report = validate_dataset("babylm-mm", babylm)
    assert not report.ok and any(p.kind == "row_count_mismatch" for p in report.problems)


@pytest.mark.parametrize("bad, message", [
    (lambda: np.array([{"vector": [0.0]}], dtype=object), "pickled"),
    (lambda: np.zeros((300, 768), np.float64), "dtype float64"),
    (lambda: np.zeros((300, 512), np.float32), "width 512"),
])
def test_feature_files_in_the_wrong_format_are_refused_from_the_header(babylm, tmp_path, bad, message):
    np.save(babylm / "babylm-mm" / CC_FILES[0], bad(), allow_pickle=True)
    with pytest.raises(FeatureFileError, match=message):
        shard(babylm, tmp_path / "out")
    report = validate_dataset("babylm-mm", babylm)
    assert any(p.kind == "bad_features" and message in p.detail for p in report.problems)


def test_validate_names_every_row_holding_nan_or_inf(babylm):
    path = babylm / "babylm-mm" / "local_narr_dino_v2_states.npy"
    matrix = np.load(path)
    matrix[[7, 150], 3] = [np.nan, np.inf]
    np.save(path, matrix)
    report = validate_dataset("babylm-mm", babylm)
    (problem,) = [p for p in report.problems if p.kind == "nonfinite_features"]
    assert problem.file == "local_narr_dino_v2_states.npy" and "2 row(s)" in problem.detail and "7, 150" in problem.detail


def test_a_caption_that_is_not_a_string_is_skipped_and_counted(babylm, tmp_path):
    path = babylm / "babylm-mm" / "local_narr_captions.json"
    captions = json.loads(path.read_text())
    captions[5] = None
    path.write_text(json.dumps(captions))
    with pytest.raises(ShardError, match="too many bad captions: 1 of 800"):
        shard(babylm, tmp_path / "out")
    index = shard(babylm, tmp_path / "out", max_bad=0.01)
    assert index["skipped"][0]["key"] == "localized-narratives-00000005"
    assert sum(info["samples"] for info in index["splits"].values()) == 799


def test_captions_that_do_not_parse_are_named_with_their_position(babylm, tmp_path):
    (babylm / "babylm-mm" / "cc_3M_captions.json").write_text('["a cat", "a dog",\n oops]')
    with pytest.raises(DatasetLayoutError, match=r"cc_3M_captions.json: line 2"):
        shard(babylm, tmp_path / "out")


def test_osf_urls_resolve_through_the_folder_listing(http_server):
    http_server.files["/v2/nodes/ad7qg/files/osfstorage/F1/?page%5Bsize%5D=100"] = json.dumps({
        "data": [{"attributes": {"kind": "file", "name": "a.json"}, "links": {"download": "https://osf.io/download/x1/"}}],
        "links": {"next": f"{http_server.url}/page2"}}).encode()
    http_server.files["/page2"] = json.dumps({
        "data": [{"attributes": {"kind": "file", "name": "b.npy"}, "links": {"download": "https://osf.io/download/x2/"}},
                 {"attributes": {"kind": "folder", "name": "sub"}, "links": {}}],
        "links": {"next": None}}).encode()
    api = f"{http_server.url}/v2"
    assert osf.resolve("osf://ad7qg/F1/b.npy", api=api) == "https://osf.io/download/x2/"
    assert osf.resolve("osf://ad7qg/F1/a.json", api=api) == "https://osf.io/download/x1/"
    with pytest.raises(DownloadError, match="has no file 'c.npy'.*a.json, b.npy"):
        osf.resolve("osf://ad7qg/F1/c.npy", api=api)
    with pytest.raises(DownloadError, match="use --mirror"):
        osf.resolve("osf://ad7qg/MISSING/c.npy", api=api)


def test_download_of_one_part_through_a_mirror_records_and_then_enforces_sha256(http_server, tmp_path):
    from trimodal.errors import ChecksumError
    from trimodal.pipeline.download.archives import RECORDED
    from trimodal.pipeline.datasets import download_dataset

    write_babylm(tmp_path / "made", cc3m=50, localized_narratives=20)
    for path in (tmp_path / "made").iterdir():
        http_server.files["/" + path.name] = path.read_bytes()
    result = download_dataset("babylm-mm", tmp_path / "data", mirror=http_server.url, only=["cc3m"])
    assert sorted(a.file for a in result.archives) == sorted(["cc_3M_captions.json", *CC_FILES])
    for name in ("cc_3M_captions.json", *CC_FILES):
        assert (tmp_path / "data" / "babylm-mm" / name).read_bytes() == (tmp_path / "made" / name).read_bytes()
    assert not (tmp_path / "data" / "babylm-mm" / "local_narr_captions.json").exists()
    recorded = json.loads((tmp_path / "data" / RECORDED).read_text())
    assert set(recorded) == {"cc_3M_captions.json", *CC_FILES}
    # A later download of a file is held to the sha256 its first download recorded.
    download_dataset("babylm-mm", tmp_path / "data", mirror=http_server.url, only=["localized-narratives"])
    http_server.files["/local_narr_captions.json"] = b'["changed"]'
    (tmp_path / "again").mkdir()
    shutil.copy(tmp_path / "data" / RECORDED, tmp_path / "again" / RECORDED)
    with pytest.raises(ChecksumError, match="local_narr_captions.json"):
        download_dataset("babylm-mm", tmp_path / "again", mirror=http_server.url, only=["localized-narratives"])
