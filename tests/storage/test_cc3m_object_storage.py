"""`mm download cc3m --root s3://…`: img2dataset writes the images into object storage itself (moto's server on
127.0.0.1, the loopback image web of tests/web_builders.py); a rerun resumes, `--retry-failed` works as on disk,
`mm validate` reads the report there, and `mm shard` adopts the tars from there (copied: no links in a bucket)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter

import fsspec
import pytest

from tests.web_builders import build_url_world, fix, serve_images
from trimodal.errors import ConfigError, StorageError
from trimodal.pipeline.datasets import download_dataset, shard_dataset
from trimodal.pipeline.download.fetch import FetchPolicy
from trimodal.pipeline.download.marker import read_marker
from trimodal.pipeline.shard.writer import ShardOptions
from trimodal.pipeline.sources import cc3m, scan_source
from trimodal.pipeline.synthesize.babylm import write_babylm
from trimodal.storage import location

FAST = FetchPolicy(attempts_per_url=2, backoff_seconds=0.01, timeout_seconds=10)
OPTIONS = {"processes": 1, "threads": 8}
TRAIN_KINDS = "oomo" + "noos" + "mo"  # o image, m 404, n not an image, s slower than the 1 s timeout


@pytest.fixture
def web(monkeypatch):
    monkeypatch.setattr(cc3m, "SAMPLES_PER_SHARD", 4)
    monkeypatch.setattr(cc3m, "TIMEOUT_SECONDS", 1.0)
    with serve_images() as server:
        train = build_url_world(server, "train", TRAIN_KINDS, slow_seconds=3.0)
        val = build_url_world(server, "val", "ooo", seed=1)
        server.files["/" + cc3m.TSV_FILES["train"]] = train.tsv
        server.files["/" + cc3m.TSV_FILES["val"]] = val.tsv
        yield server, train, val


def names(bucket: str, prefix: str) -> set[str]:
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    return {path[len(f"{bucket}/{prefix}/"):] for path in fs.find(f"{bucket}/{prefix}")}


def test_cc3m_downloads_into_object_storage_resumes_retries_and_is_sharded_from_there(web, bucket, tmp_path,
                                                                                   monkeypatch):
    server, train, val = web
    monkeypatch.setenv("TRIMODAL_CACHE", str(tmp_path / "cache"))
    root = f"s3://{bucket}/data"

    def download(**options):
        return download_dataset("cc3m", root, mirror=server.url, download_options={**OPTIONS, **options},
                                policy=FAST)

    # A first run of the first 4 rows per split, then the whole lists: the finished shard is not fetched again.
    download(max_samples=4)
    first_shard = Counter(server.requests)
    result = download()
    assert result.step["complete"]
    assert all(Counter(server.requests)[path] == count for path, count in first_shard.items()
               if path.startswith("/train/"))  # one request each: shard 00000 was kept
    stored = names(bucket, "data/cc3m")
    assert {"Train_GCC-training.tsv", "Validation_GCC-1.1.0-Validation.tsv", ".trimodal-download.json",
            "img2dataset.log", "train/00000.tar", "train/00002_stats.json", "val/00000.tar"} <= stored
    assert not {name for name in stored if name.endswith((".tmp", ".part"))}
    assert not list((tmp_path / "cache").rglob("*.tsv*"))  # the working copies are gone once uploaded
    report = result.step["splits"]["train"]
    assert (report["rows"], report["downloaded"], report["failed"]) == (10, 6, 4)
    assert result.step["log"] == f"{root}/cc3m/img2dataset.log"

    # Complete: a rerun starts nothing; the TSVs' sha256 recorded on first download sits in ROOT.
    requests = Counter(server.requests)
    assert download().already_complete and Counter(server.requests) == requests
    recorded = json.loads(fsspec.filesystem("s3").cat_file(f"{bucket}/data/.trimodal-recorded-checksums.json"))
    assert recorded[cc3m.TSV_FILES["train"]] == hashlib.sha256(train.tsv).hexdigest()

    # --retry-failed as on disk: the URLs that work now go into a new shard.
    fix(server, [train.missing[0], *train.not_image, *train.slow])
    retried = download(retry_failed=True)
    assert retried.step["splits"]["train"]["retry"]["shards"] == [3]
    assert retried.step["splits"]["train"]["downloaded"] == 9
    assert read_marker(location(root), "cc3m")["complete"]

    scan = scan_source("cc3m", root)
    assert (scan.counts["train_urls"], scan.counts["train_downloaded"], scan.counts["val_downloaded"]) == (10, 9, 3)

    # Sharded from the bucket into the bucket (copies) and onto disk: the same tars, described alike.
    remote = shard_dataset("cc3m", root, f"s3://{bucket}/shards/cc3m", ShardOptions())
    local = shard_dataset("cc3m", root, tmp_path / "shards", ShardOptions())
    assert {split: info["samples"] for split, info in remote["splits"].items()} == {"train": 9, "val": 3}
    for split in ("train", "val"):
        assert [(s["name"], s["sha256"], s["adopted_by"]) for s in remote["splits"][split]["shards"]] == \
            [(s["name"], s["sha256"], s["adopted_by"]) for s in local["splits"][split]["shards"]]
    fs = fsspec.filesystem("s3")
    for shard in remote["splits"]["train"]["shards"]:
        data = fs.cat_file(f"{bucket}/shards/cc3m/{shard['name']}")
        assert hashlib.sha256(data).hexdigest() == shard["sha256"] == \
            hashlib.sha256((tmp_path / "shards" / shard["name"]).read_bytes()).hexdigest()
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            assert {member.name.split(".", 1)[1] for member in tar} >= {"jpg", "txt", "json"}
    assert json.loads(fs.cat_file(f"{bucket}/shards/cc3m/index.json"))["splits"]["train"]["samples"] == 9


def test_cli_download_into_object_storage_and_its_errors(web, bucket, tmp_path, monkeypatch, mm):
    server, _, _ = web
    monkeypatch.setenv("TRIMODAL_CACHE", str(tmp_path / "cache"))
    result = mm("download", "cc3m", "--root", f"s3://{bucket}/data", "--mirror", server.url, "--max-samples", "3",
                "--processes", "1", "--threads", "4")
    assert result.exit_code == 0, result.output
    assert f"s3://{bucket}/data/cc3m" in result.out and "img2dataset" in result.out
    validated = mm("validate", "cc3m", "--root", f"s3://{bucket}/data")
    assert validated.exit_code == 0, validated.output
    assert "train_downloaded" in validated.out

    missing = mm("download", "cc3m", "--root", "s3://no-such-bucket-here/data", "--mirror", server.url)
    assert missing.exit_code == 1 and "Traceback" not in missing.output
    assert "no-such-bucket-here" in missing.err and "does not exist" in missing.err

    for command in (("download", "flickr8k"), ("validate", "flickr8k"), ("shard", "flickr8k", "--out", tmp_path)):
        refused = mm(*command, "--root", f"s3://{bucket}/data")
        assert refused.exit_code == 1 and "Traceback" not in refused.output, refused.output
        assert "needs a local --root" in refused.err and "cc3m" in refused.err
    assert not [name for name in names(bucket, "data") if name.startswith("flickr8k")]


def test_a_remote_root_is_refused_before_anything_is_written(bucket):
    with pytest.raises(ConfigError, match="needs a local --root"):
        download_dataset("mini", f"s3://{bucket}/data")
    with pytest.raises(StorageError, match="credentials do not go in a URL"):
        download_dataset("cc3m", f"s3://key:secret@{bucket}/data")


def test_babylm_mm_shards_into_object_storage_as_on_disk(bucket, tmp_path):
    """The source that writes its own shards (streamed, one open shard per split) writes them whole into a
    bucket: the same bytes and index as on disk, and a rerun keeps what is finished."""
    write_babylm(tmp_path / "data" / "babylm-mm", cc3m=300, localized_narratives=100)
    options = ShardOptions(max_samples=100)
    local = shard_dataset("babylm-mm", tmp_path / "data", tmp_path / "shards", options)
    remote = shard_dataset("babylm-mm", tmp_path / "data", f"s3://{bucket}/shards", options)
    assert remote["splits"] == local["splits"]
    fs = fsspec.filesystem("s3")
    for split in remote["splits"].values():
        for shard in split["shards"]:
            assert fs.cat_file(f"{bucket}/shards/{shard['name']}") == (tmp_path / "shards" / shard["name"]).read_bytes()
    assert not [name for name in names(bucket, "shards") if name.endswith(".tmp")]
    before = {path: fs.info(path)["LastModified"] for path in fs.find(f"{bucket}/shards") if path.endswith(".tar")}
    again = shard_dataset("babylm-mm", tmp_path / "data", f"s3://{bucket}/shards", options)
    assert again["splits"] == local["splits"]
    fs.invalidate_cache()
    assert {path: fs.info(path)["LastModified"] for path in before} == before  # nothing rewritten
