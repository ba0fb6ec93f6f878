import json
import tarfile

import pytest
import webdataset as wds

from tests.builders import build_flickr_tree, shard_members
from trimodal.errors import ConfigError, DatasetLayoutError, ShardError
from trimodal.pipeline.shard import writer as shard_module
from trimodal.pipeline.shard.writer import ShardOptions, plan_shards
from trimodal.pipeline.read.index import INDEX, read_index
from trimodal.pipeline.datasets import shard_dataset


@pytest.fixture
def tree(tmp_path):
    return build_flickr_tree(tmp_path / "data", train=44, val=5, test=6)


def tar_members(path):
    with tarfile.open(path) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar.getmembers()}


def test_counts_follow_the_splits(tree, tmp_path):
    index = shard_dataset("flickr8k", tree.root, tmp_path / "out")
    assert {s: v["samples"] for s, v in index["splits"].items()} == {"train": 44, "val": 5, "test": 6}
    assert {s: v["captions"] for s, v in index["splits"].items()} == {"train": 220, "val": 25, "test": 30}
    assert {s: v["utterances"] for s, v in index["splits"].items()} == {"train": 220, "val": 25, "test": 30}
    assert index["format"] == "trimodal-shards/1" and index["skipped"] == []
    assert index["modalities"] == ["image", "text", "audio"]


def test_a_training_split_of_40_or_more_gets_at_least_4_shards(tree, tmp_path):
    index = shard_dataset("flickr8k", tree.root, tmp_path / "out")
    assert [s["name"] for s in index["splits"]["train"]["shards"]] == [f"train-{i:06d}.tar" for i in range(4)]
    assert [s["samples"] for s in index["splits"]["train"]["shards"]] == [11, 11, 11, 11]
    assert len(index["splits"]["test"]["shards"]) == 1


def test_max_samples_and_max_mb_bound_every_shard(tree, tmp_path):
    index = shard_dataset("flickr8k", tree.root, tmp_path / "a", ShardOptions(max_samples=5))
    assert max(s["samples"] for split in index["splits"].values() for s in split["shards"]) <= 5
    index = shard_dataset("flickr8k", tree.root, tmp_path / "b", ShardOptions(max_mb=0.1))
    assert max(s["bytes"] for split in index["splits"].values() for s in split["shards"]) <= 0.1e6 + 20_000


def test_keys_are_unique_dot_free_and_members_contiguous(tree, tmp_path):
    out = tmp_path / "out"
    shard_dataset("flickr8k", tree.root, out)
    seen, keys = set(), []
    for path in sorted(out.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key = member.name.split(".")[0]
                if not keys or keys[-1] != key:
                    assert key not in seen, f"members of {key} are not contiguous"
                    seen.add(key)
                    keys.append(key)
    assert len(keys) == 55 and all("." not in key for key in keys)


def test_bytes_and_captions_are_identical_to_the_source(tree, tmp_path):
    out = tmp_path / "out"
    shard_dataset("flickr8k", tree.root, out)
    members = shard_members(out)
    key = tree.splits["val"][2]
    assert members[f"{key}.jpg"] == tree.image(key).read_bytes()
    for n in range(5):
        assert members[f"{key}.{n}.wav"] == tree.wav(key, n).read_bytes()
    assert members[f"{key}.txt"].decode().splitlines() == [tree.caption(key, n) for n in range(5)]
    meta = json.loads(members[f"{key}.json"])
    assert meta["key"] == key and meta["split"] == "val"
    assert [c["id"] for c in meta["captions"]] == [0, 1, 2, 3, 4]
    assert [c["audio"] for c in meta["captions"]] == [f"{n}.wav" for n in range(5)]
    assert all(c["speaker"] for c in meta["captions"])
    assert meta["source"] == {"dataset": "flickr8k", "image": f"flickr8k/Flicker8k_Dataset/{key}.jpg", "audio": "facc"}


def test_the_index_records_each_shard(tree, tmp_path):
    import hashlib

    out = tmp_path / "out"
    index = shard_dataset("flickr8k", tree.root, out)
    for split in index["splits"].values():
        for shard in split["shards"]:
            data = (out / shard["name"]).read_bytes()
            assert shard["bytes"] == len(data) and shard["sha256"] == hashlib.sha256(data).hexdigest()
            keys = list(dict.fromkeys(name.split(".")[0] for name in tar_members(out / shard["name"])))
            assert (shard["first_key"], shard["last_key"]) == (keys[0], keys[-1]) and shard["samples"] == len(keys)


def test_same_inputs_give_byte_identical_tars_whatever_the_worker_count(tree, tmp_path):
    shard_dataset("flickr8k", tree.root, tmp_path / "a", ShardOptions(workers=1))
    shard_dataset("flickr8k", tree.root, tmp_path / "b", ShardOptions(workers=2))
    names = sorted(p.name for p in (tmp_path / "a").glob("*.tar"))
    assert names == sorted(p.name for p in (tmp_path / "b").glob("*.tar"))
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_the_seed_changes_only_the_training_order(tree, tmp_path):
    a = shard_dataset("flickr8k", tree.root, tmp_path / "a", ShardOptions(seed=0))
    b = shard_dataset("flickr8k", tree.root, tmp_path / "b", ShardOptions(seed=1))
    assert a["splits"]["train"]["shards"] != b["splits"]["train"]["shards"]
    assert a["splits"]["test"]["shards"] == b["splits"]["test"]["shards"]


def test_a_rerun_after_an_interrupted_run_finishes_and_skips_complete_shards(tree, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_write = shard_module.write_shard
    written = []

    def interrupt_on_third(job, out_dir, advance=lambda n: None):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(job.name)
        return real_write(job, out_dir, advance)

    monkeypatch.setattr(shard_module, "write_shard", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        shard_dataset("flickr8k", tree.root, out)
    assert not (out / INDEX).exists()
    first = {name: (out / name).stat().st_mtime_ns for name in written}

    rewritten = []

    def record(job, out_dir, advance=lambda n: None):
        rewritten.append(job.name)
        return real_write(job, out_dir, advance)

    monkeypatch.setattr(shard_module, "write_shard", record)
    index = shard_dataset("flickr8k", tree.root, out)
    assert set(rewritten).isdisjoint(written) and len(rewritten) == 4
    assert {name: (out / name).stat().st_mtime_ns for name in written} == first
    shard_dataset("flickr8k", tree.root, tmp_path / "fresh")
    for name in sorted(p.name for p in out.glob("*.tar")):
        assert (out / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()
    assert index["splits"]["train"]["samples"] == 44


def test_a_rerun_with_other_sizes_removes_the_old_shards(tree, tmp_path):
    out = tmp_path / "out"
    shard_dataset("flickr8k", tree.root, out, ShardOptions(max_samples=3))
    index = shard_dataset("flickr8k", tree.root, out)
    listed = {s["name"] for split in index["splits"].values() for s in split["shards"]}
    assert {p.name for p in out.glob("*.tar")} == listed


def test_a_corrupt_image_past_max_bad_fails_and_writes_no_index(tree, tmp_path):
    key = tree.splits["train"][5]
    tree.image(key).write_bytes(tree.image(key).read_bytes()[:200])
    out = tmp_path / "out"
    with pytest.raises(ShardError, match=rf"1 of 55 samples .* more than --max-bad 0.001.*{key}"):
        shard_dataset("flickr8k", tree.root, out)
    assert not (out / INDEX).exists()


def test_within_max_bad_a_bad_image_drops_its_sample_and_is_listed(tree, tmp_path):
    key = tree.splits["train"][5]
    tree.image(key).unlink()
    index = shard_dataset("flickr8k", tree.root, tmp_path / "out", ShardOptions(max_bad=0.2))
    assert index["splits"]["train"]["samples"] == 43
    assert [(s["key"], s["reason"]) for s in index["skipped"]] == [(key, "image missing")]
    assert not any(name.startswith(key) for name in shard_members(tmp_path / "out"))


def test_a_corrupt_wav_drops_only_that_utterance(tree, tmp_path):
    key = tree.splits["test"][0]
    tree.wav(key, 3).write_bytes(tree.wav(key, 3).read_bytes()[:-500])
    index = shard_dataset("flickr8k", tree.root, tmp_path / "out", ShardOptions(max_bad=0.01))
    members = shard_members(tmp_path / "out")
    assert f"{key}.jpg" in members and f"{key}.3.wav" not in members and f"{key}.2.wav" in members
    assert index["splits"]["test"]["captions"] == 30 and index["splits"]["test"]["utterances"] == 29
    [skipped] = index["skipped"]
    assert skipped["key"] == key and skipped["file"] == f"{key}_3.wav" and "truncated" in skipped["reason"]
    meta = json.loads(members[f"{key}.json"])
    assert meta["captions"][3]["audio"] is None


def test_malformed_annotation_lines_stop_sharding(tree, tmp_path):
    tree.token_file.write_text(tree.token_file.read_text().replace("\t", " ", 1))
    with pytest.raises(DatasetLayoutError, match=r"Flickr8k.token.txt:1: no TAB"):
        shard_dataset("flickr8k", tree.root, tmp_path / "out")


def test_without_facc_samples_carry_image_and_text(tmp_path):
    tree = build_flickr_tree(tmp_path / "data", facc=False)
    index = shard_dataset("flickr8k", tree.root, tmp_path / "out")
    assert index["modalities"] == ["image", "text"] and index["splits"]["train"]["utterances"] == 0
    assert not any(name.endswith(".wav") for name in shard_members(tmp_path / "out"))


def test_reading_back_with_webdataset(tree, tmp_path):
    out = tmp_path / "out"
    index = shard_dataset("flickr8k", tree.root, out)
    urls = [str(out / s["name"]) for s in index["splits"]["train"]["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == 44
    first = samples[0]
    assert {"jpg", "txt", "json", "0.wav", "4.wav"} <= set(first)
    assert first["__key__"] == index["splits"]["train"]["shards"][0]["first_key"]


@pytest.mark.parametrize("options, message", [
    (ShardOptions(max_bad=2), "--max-bad"), (ShardOptions(max_samples=0), "--max-samples"),
    (ShardOptions(max_mb=0), "--max-mb"), (ShardOptions(workers=0), "--workers"),
])
def test_bad_options_are_config_errors(tree, tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        shard_dataset("flickr8k", tree.root, tmp_path / "out", options)


def test_plan_shards_balances_counts_within_limits():
    assert plan_shards([1] * 10, max_samples=4, max_bytes=1e9) == [(0, 4), (4, 8), (8, 10)]
    assert plan_shards([1] * 40, max_samples=1000, max_bytes=1e9, min_shards=4) == [(0, 10), (10, 20), (20, 30), (30, 40)]
    assert plan_shards([5, 5, 5, 5], max_samples=10, max_bytes=10) == [(0, 2), (2, 4)]
    assert plan_shards([], 10, 10) == []


def test_read_index_refuses_a_folder_without_one(tmp_path):
    with pytest.raises(ShardError, match="no index.json"):
        read_index(tmp_path)


def test_tar_stream_writes_exactly_what_tarfile_writes():
    import io

    from trimodal.pipeline.shard.writer import TAR_MTIME, TarStream

    members = [("k.jpg", b"x" * 1000), ("k.txt", b"hello\n"), ("k.0.wav", b"y" * 512), ("k.json", b""),
               ("1000268201_693b08cb0e.json", b"{}" * 300), ("k" * 99 + ".txt", b"long name"), ("kéy.txt", b"x")]
    ours = io.BytesIO()
    stream = TarStream(ours)
    for name, data in members:
        stream.add(name, data)
    stream.close()
    reference = io.BytesIO()
    with tarfile.open(fileobj=reference, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = \
                len(data), TAR_MTIME, 0o444, 0, 0, "", ""
            tar.addfile(info, io.BytesIO(data))
    assert ours.getvalue() == reference.getvalue() and stream.size == len(ours.getvalue())
