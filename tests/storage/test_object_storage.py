"""Shards, feature stores and runs in object storage: a real S3 API (moto's server on 127.0.0.1), s3fs as
the client, credentials in the environment only."""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pytest
import torch
from safetensors.torch import load

from tests.storage.conftest import SECRET, CuttingProxy, free_port, start_moto
from trimodal.features.store import FeatureStore
from trimodal.training.config import shipped_config

TRAIN = ["train.epochs=1", "train.num_workers=1"]


def objects(bucket: str) -> dict[str, bytes]:
    fs = fsspec.filesystem("s3")
    return {path[len(bucket) + 1:]: fs.cat_file(path) for path in fs.find(bucket)}


def assert_same_store(a, b) -> None:
    a, b = FeatureStore.open(a), FeatureStore.open(b)
    assert a.slots.keys() == b.slots.keys()
    for name in a.slots:
        x, y = a.read_shard(name), b.read_shard(name)
        assert x.keys == y.keys, name
        for field in ("image", "mel", "frame_offsets", "tokens", "caption_offsets"):
            assert np.array_equal(getattr(x, field), getattr(y, field)), (name, field)


def assert_same_weights(stored: bytes, local) -> None:
    """Bit for bit, tensor by tensor (the header's metadata order is not fixed between processes)."""
    a, b = load(stored), load(local.read_bytes())
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def one_error_line(result) -> str:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.err.splitlines() if line.strip()]  # progress lines may come first
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], result.output
    assert SECRET not in result.output
    return lines[-1]


def test_shard_featurize_train_eval_on_s3_equal_the_same_on_local_disk(bucket, mini_root, mini_shards, mini_features,
                                                                      mm, tmp_path, monkeypatch):
    monkeypatch.setenv("TRIMODAL_CACHE", str(tmp_path / "cache"))
    s3 = f"s3://{bucket}"
    said = []

    def run(*args):
        result = mm(*args)
        said.append(result.output)
        assert result.exit_code == 0, result.output
        return result

    run("shard", "mini", "--root", mini_root, "--out", f"{s3}/shards")
    stored = objects(bucket)
    for path in sorted(mini_shards.glob("*.tar")) + [mini_shards / "index.json"]:
        assert stored[f"shards/{path.name}"] == path.read_bytes(), path.name
    assert not any(name.endswith(".tmp") for name in stored)

    run("featurize", f"{s3}/shards", "--out", f"{s3}/features.zarr", "--device", "cpu")
    assert_same_store(f"{s3}/features.zarr", mini_features)

    config = shipped_config("mmn-tiny")
    run("train", config, "--shards", mini_shards, "--features", mini_features, "--out", tmp_path / "local", *TRAIN)
    run("train", config, "--shards", f"{s3}/shards", "--features", f"{s3}/features.zarr", "--out", f"{s3}/runs/r",
        *TRAIN)
    stored = objects(bucket)
    local = tmp_path / "local"
    for name in ("last", "best"):
        assert_same_weights(stored[f"runs/r/checkpoints/{name}.safetensors"], local / f"checkpoints/{name}.safetensors")
    assert {"runs/r/config.resolved.toml", "runs/r/metrics.jsonl", "runs/r/checkpoints/last.state.pt"} <= set(stored)

    run("eval", local, "--split", "test")
    run("eval", f"{s3}/runs/r", "--split", "test")
    remote = json.loads(objects(bucket)["runs/r/eval-test.json"])
    here = json.loads((local / "eval-test.json").read_text())
    assert remote["directions"] == here["directions"]

    # The resolved config names the URLs, and no secret is anywhere: objects, the local copy, what was said.
    assert f"{s3}/shards" in objects(bucket)["runs/r/config.resolved.toml"].decode()
    for name, data in objects(bucket).items():
        assert SECRET.encode() not in data, name
    for path in (tmp_path / "cache").rglob("*"):
        assert not path.is_file() or SECRET.encode() not in path.read_bytes(), path
    assert not any(SECRET in text for text in said)

    info = mm("info", f"{s3}/shards")
    assert info.exit_code == 0 and "mini" in info.output and "missing" not in info.output.lower()


def test_a_run_in_s3_resumes_from_its_published_checkpoint(bucket, mini_shards, mini_features, mm, tmp_path,
                                                          monkeypatch):
    monkeypatch.setenv("TRIMODAL_CACHE", str(tmp_path / "cache"))
    run = f"s3://{bucket}/runs/resumed"
    common = [shipped_config("mmn-tiny"), "--shards", mini_shards, "--features", mini_features, "train.num_workers=0"]
    assert mm("train", *common, "--out", run, "train.epochs=1").exit_code == 0
    refused = mm("train", *common, "--out", run, "train.epochs=2")
    assert "is not empty" in one_error_line(refused)
    # A fresh machine: nothing in the local copy, everything from the bucket.
    monkeypatch.setenv("TRIMODAL_CACHE", str(tmp_path / "elsewhere"))
    assert mm("train", *common, "--out", run, "train.epochs=2", "--resume").exit_code == 0
    assert mm("train", *common, "--out", tmp_path / "straight", "train.epochs=2").exit_code == 0
    assert_same_weights(objects(bucket)["runs/resumed/checkpoints/last.safetensors"],
                        tmp_path / "straight/checkpoints/last.safetensors")


# --- failures: one line each ------------------------------------------------------------------------------


def test_a_missing_bucket_is_one_line(bucket, mini_root, mm, tmp_path):
    assert "does not exist" in one_error_line(mm("info", "s3://no-such-bucket-here/shards"))
    line = one_error_line(mm("shard", "mini", "--root", mini_root, "--out", "s3://no-such-bucket-here/shards"))
    assert "bucket no-such-bucket-here does not exist" in line
    assert not fsspec.filesystem("s3").exists("no-such-bucket-here")  # and it was not created


def test_a_missing_key_is_one_line(bucket, mm, tmp_path):
    line = one_error_line(mm("featurize", f"s3://{bucket}/nothing-here", "--out", tmp_path / "store.zarr"))
    assert "has no index.json" in line


def test_credentials_in_a_url_are_refused(mm, tmp_path):
    line = one_error_line(mm("info", f"s3://AKIAEXAMPLE:{SECRET}@bucket/shards"))
    assert "credentials do not go in a URL" in line


def test_a_refused_connection_is_one_line(s3_env, mm):
    s3_env(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    line = one_error_line(mm("info", "s3://bucket/shards"))
    assert "cannot reach the storage" in line


@pytest.fixture(scope="module")
def guarded_server():
    """A second moto server that checks credentials: the first actions (making a user with no rights and its
    key, a bucket) need none; after that every request must be signed by a known key."""
    server = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "4"})
    import boto3

    options = dict(endpoint_url=server.url, region_name="us-east-1", aws_access_key_id="setup",
                   aws_secret_access_key="setup")
    iam = boto3.client("iam", **options)
    iam.create_user(UserName="nobody")
    key = iam.create_access_key(UserName="nobody")["AccessKey"]
    boto3.client("s3", **options).create_bucket(Bucket="guarded")
    yield server, key["AccessKeyId"], key["SecretAccessKey"]
    server.process.terminate()
    server.process.wait(10)


def test_an_unknown_key_is_one_line(guarded_server, s3_env, mm):
    server, _, _ = guarded_server
    s3_env(server.url, key="AKIANOTAKNOWNKEY0000")
    line = one_error_line(mm("info", "s3://guarded/shards"))
    assert "s3://guarded/shards" in line and ("denied" in line or "credentials" in line)


def test_access_denied_is_one_line(guarded_server, s3_env, mm):
    server, key, secret = guarded_server
    s3_env(server.url, key=key, secret=secret)
    line = one_error_line(mm("info", "s3://guarded/shards"))
    assert "access denied" in line and secret not in line


# --- a connection cut while a shard streams ---------------------------------------------------------------


def test_a_connection_cut_mid_shard_is_retried_and_then_named(bucket, moto_server, s3_env, mini_shards, mm, tmp_path):
    fs = fsspec.filesystem("s3")
    fs.put(str(mini_shards), f"{bucket}/shards", recursive=True)
    host, port = moto_server.url.removeprefix("http://").split(":")
    proxy = CuttingProxy((host, int(port)), after=300_000, cuts=1).start()
    try:
        s3_env(proxy.url)
        options = ["--device", "cpu", "--image", "none", "--text", "none"]  # the audio only: a quick read
        assert mm("featurize", f"s3://{bucket}/shards", "--out", tmp_path / "once.zarr", *options).exit_code == 0
        assert proxy.done == 1  # the cut happened, and the read went on

        proxy.cuts, proxy.done = 10_000, 0  # every connection cut: retried, then named
        s3_env(proxy.url)
        line = one_error_line(mm("featurize", f"s3://{bucket}/shards", "--out", tmp_path / "never.zarr", *options))
        assert f"s3://{bucket}/shards/" in line and ("cannot reach" in line or "cannot read shard" in line)
    finally:
        proxy.close()


def test_memory_urls_work_as_folders_do(mini_root, mini_shards, mm):
    """fsspec's in-memory file system, as any other: shard, info, featurize."""
    import uuid

    base = f"memory://trimodal-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("memory")
    try:
        assert mm("shard", "mini", "--root", mini_root, "--out", f"{base}/shards").exit_code == 0
        for path in sorted(mini_shards.glob("*.tar")):
            assert fs.cat_file(f"{base}/shards/{path.name}") == path.read_bytes(), path.name
        assert mm("info", f"{base}/shards").exit_code == 0
        result = mm("featurize", f"{base}/shards", "--out", f"{base}/features.zarr", "--device", "cpu",
                    "--image", "none", "--splits", "test")
        assert result.exit_code == 0, result.output
        assert FeatureStore.open(f"{base}/features.zarr").complete("test")
    finally:
        fs.rm(base.removeprefix("memory://"), recursive=True)


def test_two_ranks_featurize_into_s3_the_store_one_process_writes(bucket, mini_shards, mini_features):
    """Under torchrun (2 gloo ranks) each rank's parts are objects beside the store, merged by rank 0: the
    same store as one process on local disk, and no part left behind."""
    from tests.launch import mm_torchrun, succeeded

    store = f"s3://{bucket}/features/mini.zarr"
    succeeded(mm_torchrun("featurize", mini_shards, "--out", store, "--device", "cpu"))  # the environment's S3
    assert_same_store(mini_features, store)
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    assert not [path for path in fs.find(f"{bucket}/features") if ".parts" in path or path.endswith(".tmp")]
