"""Flickr30k: `mm download flickr30k` of the real archives' layouts from the loopback server (the images
archive, the token file's archive, Karpathy's caption_datasets.zip checksummed and only its Flickr30k file
kept), then validate and shard into Karpathy's splits; the Kaggle re-pack reads the same."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from tests.builders import make_jpeg, manifest_expecting, shard_members, zip_with
from trimodal.pipeline import datasets as datasets_module
from trimodal.pipeline.datasets import download_dataset, shard_dataset, validate_dataset
from trimodal.pipeline.download.fetch import FetchPolicy
from trimodal.pipeline.sources import scan_source

FAST = FetchPolicy(attempts_per_url=3, backoff_seconds=0.01, timeout_seconds=10)
SPLITS = {"train": 4, "val": 2, "test": 2}
WORDS = ["dog", "cat", "bicycle", "beach", "tree", "boat", "child", "street"]


def _images() -> list[tuple[str, str, list[str]]]:
    """(id, Karpathy split, five captions) in the Karpathy file's order (splits interleaved, as the real file)."""
    rows, number = [], 0
    for split in ("train", "test", "val", "train", "train", "test", "val", "train"):
        stem = str(1000092795 + 7919 * number)
        rows.append((stem, split, [f"A {WORDS[number]} photo number {number}, caption {n} ." for n in range(5)]))
        number += 1
    assert {s: sum(1 for _, split, _ in rows if split == s) for s in SPLITS} == SPLITS
    return rows


def _karpathy(rows) -> bytes:
    images = [{"filename": f"{stem}.jpg", "imgid": i, "split": split, "sentids": list(range(5 * i, 5 * i + 5)),
               "sentences": [{"raw": text, "tokens": text.lower().split(), "imgid": i, "sentid": 5 * i + n}
                             for n, text in enumerate(captions)]}
              for i, (stem, split, captions) in enumerate(rows)]
    return json.dumps({"images": images, "dataset": "flickr30k"}).encode()


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as bundle:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            bundle.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _archives(rows) -> dict[str, bytes]:
    token = "".join(f"{stem}.jpg#{n}\t{text}\n" for stem, _, captions in rows for n, text in enumerate(captions))
    return {
        "flickr30k-images.tar.gz": _tar_gz({f"flickr30k-images/{stem}.jpg": make_jpeg(i)
                                            for i, (stem, _, _) in enumerate(rows)}),
        "flickr30k.tar.gz": _tar_gz({"results_20130124.token": token.encode(), "readme.txt": b"Flickr30k\n"}),
        "caption_datasets.zip": zip_with({"dataset_coco.json": b'{"images": [], "dataset": "coco"}',
                                          "dataset_flickr8k.json": b'{"images": [], "dataset": "flickr8k"}',
                                          "dataset_flickr30k.json": _karpathy(rows)}),
    }


@pytest.fixture
def downloaded(http_server, monkeypatch, tmp_path) -> Path:
    rows = _images()
    archives = _archives(rows)
    for file, data in archives.items():
        http_server.files[f"/{file}"] = data
    monkeypatch.setattr(datasets_module, "load_manifest", lambda name: manifest_expecting(
        name, archives, lambda file: [f"{http_server.url}/not-the-mirror/{file}"]))
    download_dataset("flickr30k", tmp_path / "data", mirror=http_server.url, policy=FAST)
    return tmp_path / "data"


def test_download_unpacks_the_real_layout_and_keeps_only_karpathys_flickr30k_file(downloaded):
    folder = downloaded / "flickr30k"
    assert (folder / "results_20130124.token").is_file() and (folder / "dataset_flickr30k.json").is_file()
    assert len(list((folder / "flickr30k-images").glob("*.jpg"))) == len(_images())
    assert not (folder / "dataset_coco.json").exists() and not (folder / "dataset_flickr8k.json").exists()


def test_validate_and_shard_follow_karpathys_splits_and_order_with_every_caption(downloaded, tmp_path):
    report = validate_dataset("flickr30k", downloaded)
    assert not [p for p in report.problems if p.severity == "error"], report.problems
    index = shard_dataset("flickr30k", downloaded, tmp_path / "shards")
    assert {split: info["samples"] for split, info in index["splits"].items()} == SPLITS
    assert {split: info["captions"] for split, info in index["splits"].items()} == {s: 5 * n for s, n in SPLITS.items()}
    members = shard_members(tmp_path / "shards")
    rows = _images()
    test_keys = [stem for stem, split, _ in rows if split == "test"]
    shard_keys = list(dict.fromkeys(name.split(".")[0] for name in members))
    assert [k for k in shard_keys if k in test_keys] == test_keys  # the 1k test in Karpathy's order
    stem, _, captions = rows[0]
    assert members[f"{stem}.txt"].decode().splitlines() == [" ".join(c.split()) for c in captions]


def test_the_kaggle_repack_reads_the_same_samples(downloaded, tmp_path):
    rows = _images()
    kaggle = tmp_path / "kaggle" / "flickr30k"
    images = kaggle / "flickr30k_images" / "flickr30k_images"
    images.mkdir(parents=True)
    for path in (downloaded / "flickr30k" / "flickr30k-images").glob("*.jpg"):
        (images / path.name).write_bytes(path.read_bytes())
    lines = ["image_name| comment_number| comment"] + [f"{stem}.jpg| {n}| {text}" for stem, _, captions in rows
                                                       for n, text in enumerate(captions)]
    (kaggle / "flickr30k_images" / "results.csv").write_text("\n".join(lines) + "\n")
    (kaggle / "dataset_flickr30k.json").write_bytes((downloaded / "flickr30k" / "dataset_flickr30k.json").read_bytes())
    official, repack = scan_source("flickr30k", downloaded), scan_source("flickr30k", kaggle.parent)
    assert [(s.key, s.split, [c.text for c in s.captions]) for s in repack.samples] == \
        [(s.key, s.split, [c.text for c in s.captions]) for s in official.samples]
    assert not [p for p in repack.problems if p.severity == "error"]


def test_a_malformed_token_line_and_a_missing_karpathy_file_are_named(downloaded):
    folder = downloaded / "flickr30k"
    token = folder / "results_20130124.token"
    token.write_text(token.read_text() + "not a caption line\n")
    (folder / "dataset_flickr30k.json").unlink()
    problems = scan_source("flickr30k", downloaded).problems
    malformed = next(p for p in problems if p.kind == "malformed_line")
    assert malformed.file.endswith("results_20130124.token") and malformed.line == 5 * len(_images()) + 1
    missing = next(p for p in problems if p.kind == "missing_file")
    assert "dataset_flickr30k.json" in missing.file and "caption_datasets.zip" in missing.detail
