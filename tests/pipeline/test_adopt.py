"""Adopting img2dataset's webdataset output: linked into OUT, described by index.json, readable by everyone."""

import hashlib
import io
import json
import os

import pytest
import webdataset as wds

from tests.builders import make_jpeg
from trimodal.errors import DatasetLayoutError, ShardError
from trimodal.pipeline.shard import adopt
from trimodal.pipeline.shard.writer import ShardOptions
from trimodal.pipeline.datasets import shard_dataset
from trimodal.pipeline.read.shards import read_shard


def write_img2dataset_shard(path, shard_id, rows, *, captions=None, drop=()):
    """A tar as img2dataset writes it: key = shard_id * 10^4 + row (9 digits), KEY.jpg/.txt/.json."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for row in range(rows):
            key = f"{shard_id * 10_000 + row:09d}"
            caption = (captions or {}).get(row, f"a photo number {row} of shard {shard_id}")
            sample = {"__key__": key, "jpg": make_jpeg(shard_id * 100 + row), "txt": caption,
                      "json": json.dumps({"caption": caption, "url": f"http://x/{key}.jpg", "key": key,
                                          "status": "success", "error_message": None, "width": 64, "height": 48,
                                          "original_width": 640, "original_height": 480, "exif": "{}",
                                          "sha256": "0" * 64}).encode()}
            for member in drop if row == 1 else ():
                del sample[member]
            sink.write(sample)


def test_a_flat_output_folder_becomes_the_train_split_without_copying(tmp_path):
    folder = tmp_path / "laion-part"
    write_img2dataset_shard(folder / "00000.tar", 0, 5)
    write_img2dataset_shard(folder / "00001.tar", 1, 3)
    index = shard_dataset("img2dataset", folder, tmp_path / "out")
    shards = index["splits"]["train"]["shards"]
    assert list(index["splits"]) == ["train"] and index["splits"]["train"]["samples"] == 8
    assert [s["name"] for s in shards] == ["train-000000.tar", "train-000001.tar"]
    for shard, source in zip(shards, ["00000.tar", "00001.tar"]):
        adopted = tmp_path / "out" / shard["name"]
        assert os.path.samefile(adopted, folder / source) and shard["adopted_by"] == "hardlink"
        assert shard["sha256"] == hashlib.sha256((folder / source).read_bytes()).hexdigest()
        assert shard["bytes"] == adopted.stat().st_size
    assert shards[1]["min_key"] == "000010000" and shards[1]["max_key"] == "000010002"
    contents = read_shard(tmp_path / "out" / "train-000001.tar")
    assert contents.keys == ["000010000", "000010001", "000010002"]
    assert contents.captions[1] == "a photo number 1 of shard 1" and contents.caption_ids == [0, 0, 0]
    assert all(image.startswith(b"\xff\xd8") for image in contents.images)
    # Plain webdataset reads the adopted shards too.
    keys = [sample["__key__"] for sample in wds.WebDataset([str(tmp_path / "out" / s["name"]) for s in shards],
                                                           shardshuffle=False)]
    assert len(keys) == 8


def test_split_folders_become_splits(tmp_path):
    write_img2dataset_shard(tmp_path / "cc" / "train" / "00000.tar", 0, 4)
    write_img2dataset_shard(tmp_path / "cc" / "val" / "00000.tar", 0, 2)
    index = shard_dataset("img2dataset", tmp_path / "cc", tmp_path / "out")
    assert {split: info["samples"] for split, info in index["splits"].items()} == {"train": 4, "val": 2}
    assert index["modalities"] == ["image", "text"] and index["args"]["adopted"] is True


def test_a_rerun_reads_no_tar_again(tmp_path, monkeypatch):
    folder = tmp_path / "out-folder"
    write_img2dataset_shard(folder / "00000.tar", 0, 3)
    first = shard_dataset("img2dataset", folder, tmp_path / "out")
    monkeypatch.setattr(adopt, "_read", lambda *a: pytest.fail("a finished shard was read again"))
    assert shard_dataset("img2dataset", folder, tmp_path / "out") == first


def test_a_sample_without_caption_is_dropped_by_a_listed_copy(tmp_path):
    folder = tmp_path / "i2d"
    write_img2dataset_shard(folder / "00000.tar", 0, 40, captions={1: ""})
    with pytest.raises(ShardError, match="1 of 40 .* lack an image or a caption"):
        shard_dataset("img2dataset", folder, tmp_path / "out")
    assert not (tmp_path / "out" / "index.json").exists()
    index = shard_dataset("img2dataset", folder, tmp_path / "out", ShardOptions(max_bad=0.05))
    (shard,) = index["splits"]["train"]["shards"]
    assert shard["adopted_by"] == "copy" and shard["samples"] == 39
    assert index["skipped"] == [{"split": "train", "key": "000000001", "file": "00000.tar",
                                 "reason": "no caption (empty or missing .txt)"}]
    assert "000000001" not in read_shard(tmp_path / "out" / shard["name"]).keys


def test_a_sample_without_image_is_listed(tmp_path):
    write_img2dataset_shard(tmp_path / "i2d" / "00000.tar", 0, 3, drop=("jpg",))
    index = shard_dataset("img2dataset", tmp_path / "i2d", tmp_path / "out", ShardOptions(max_bad=0.5))
    assert index["skipped"][0]["reason"] == "no image member"


def test_overlapping_key_ranges_are_refused(tmp_path):
    write_img2dataset_shard(tmp_path / "i2d" / "00000.tar", 0, 3)
    write_img2dataset_shard(tmp_path / "i2d" / "00007.tar", 0, 3)  # another run's shard 0
    with pytest.raises(ShardError, match="key ranges of train-000000.tar and train-000001.tar overlap"):
        shard_dataset("img2dataset", tmp_path / "i2d", tmp_path / "out")


def test_a_damaged_tar_is_named(tmp_path):
    write_img2dataset_shard(tmp_path / "i2d" / "00000.tar", 0, 3)
    data = (tmp_path / "i2d" / "00000.tar").read_bytes()
    (tmp_path / "i2d" / "00000.tar").write_bytes(data[:700] + io.BytesIO(b"\x07" * 600).read() + data[1300:])
    with pytest.raises(ShardError, match=r"cannot read .*00000.tar"):
        shard_dataset("img2dataset", tmp_path / "i2d", tmp_path / "out")


def test_a_folder_without_tars_says_what_it_expected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetLayoutError, match="holds no webdataset tars"):
        shard_dataset("img2dataset", tmp_path / "empty", tmp_path / "out")


def test_a_tar_img2dataset_had_not_finished_is_left_out_and_said(tmp_path):
    folder = tmp_path / "i2d"
    write_img2dataset_shard(folder / "00000.tar", 0, 3)
    write_img2dataset_shard(folder / "00001.tar", 1, 2)  # cut off: no 00001_stats.json yet
    (folder / "00000_stats.json").write_text('{"count": 3, "successes": 3}')
    index = shard_dataset("img2dataset", folder, tmp_path / "out")
    assert index["splits"]["train"]["samples"] == 3 and len(index["splits"]["train"]["shards"]) == 1
    (problem,) = index["annotation_problems"]
    assert "00001.tar: no 00001_stats.json" in problem and "not adopted" in problem
