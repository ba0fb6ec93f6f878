import json
import tarfile

from trimodal.pipeline.download.marker import read_marker
from trimodal.pipeline.sources import scan_source
from trimodal.pipeline.datasets import validate_dataset


def test_mini_coco_is_laid_out_like_coco2014_plus_spokencoco(mini_coco_root):
    folder = mini_coco_root / "mini-coco"
    assert len(list((folder / "train2014").glob("COCO_train2014_*.jpg"))) == 150
    assert len(list((folder / "val2014").glob("COCO_val2014_*.jpg"))) == 150
    for name in ("annotations/captions_train2014.json", "annotations/captions_val2014.json", "dataset_coco.json",
                 "SpokenCOCO/SpokenCOCO_train.json", "SpokenCOCO/SpokenCOCO_val.json"):
        assert (folder / name).is_file(), name
    spoken = json.loads((folder / "SpokenCOCO" / "SpokenCOCO_val.json").read_text())["data"][0]
    assert spoken["image"].startswith("val2014/COCO_val2014_") and spoken["captions"][0]["wav"].startswith("wavs/val/")
    assert read_marker(mini_coco_root, "mini-coco")["complete"] is True


def test_mini_coco_validates_with_karpathy_splits_and_every_utterance_joined(mini_coco_root):
    report = validate_dataset("mini-coco", mini_coco_root)
    assert report.ok and not [p for p in report.problems if p.severity == "warning"]
    counts = report.counts
    assert (counts["train"], counts["val"], counts["test"]) == (200, 40, 60)
    assert counts["karpathy_restval"] == 50 and counts["unmatched_utterances"] == 0
    assert counts["joined_by_transcript"] == 2 and counts["joined_by_id"] == counts["utterances"] - 2
    assert max(len(sample.captions) for sample in scan_source("mini-coco", mini_coco_root).samples) >= 6


def test_mini_coco_shards_keep_caption_ids_raw_text_and_audio(mini_coco_shards, mini_coco_root):
    index = json.loads((mini_coco_shards / "index.json").read_text())
    assert index["modalities"] == ["image", "text", "audio"] and index["skipped"] == []
    raw_with_quirks = 0
    with tarfile.open(mini_coco_shards / index["splits"]["test"]["shards"][0]["name"]) as tar:
        for member in tar.getmembers():
            if member.name.endswith(".json"):
                meta = json.loads(tar.extractfile(member).read())
                text = tar.extractfile(member.name[:-5] + ".txt").read().decode().splitlines()
                assert [" ".join(c["text"].split()) for c in meta["captions"]] == text
                assert all(c["audio"] == f"{n}.wav" for n, c in enumerate(meta["captions"]))
                raw_with_quirks += sum(c["text"] != t for c, t in zip(meta["captions"], text))
    assert raw_with_quirks > 0  # stray spaces and newlines kept in KEY.json, collapsed in KEY.txt
