import json
import shutil

import pytest

from tests.builders import shard_members
from tests.coco_builders import build_coco_tree
from trimodal.errors import ConfigError, DatasetLayoutError
from trimodal.pipeline.shard.writer import ShardOptions
from trimodal.pipeline.datasets import shard_dataset
from trimodal.pipeline.sources import scan_source
from trimodal.pipeline.datasets import validate_dataset


@pytest.fixture
def tree(tmp_path):
    return build_coco_tree(tmp_path / "data", spoken=False)


def kinds(report, severity="error"):
    return sorted({p.kind for p in report.problems if p.severity == severity})


def test_karpathy_splits_put_restval_into_train(tree):
    scan = scan_source("coco2014", tree.root)
    assert {split: scan.counts[split] for split in ("train", "val", "test")} == {"train": 8, "val": 3, "test": 4}
    restval = next(image for image in tree.images if image.karpathy == "restval")
    sample = next(s for s in scan.samples if s.key == restval.key)
    assert sample.split == "train" and sample.meta["karpathy_split"] == "restval" and sample.meta["cocoid"] == restval.cocoid


def test_official_splits_follow_the_image_folders(tree):
    scan = scan_source("coco2014", tree.root, splits="official")
    by_key = {sample.key: sample.split for sample in scan.samples}
    for image in tree.images:
        assert by_key[image.key] == ("train" if image.folder == "train2014" else "val")
    assert scan.counts["test"] == 0


def test_keys_are_file_stems_and_captions_sorted_by_annotation_id(tree):
    scan = scan_source("coco2014", tree.root)
    image = tree.images[0]
    sample = next(s for s in scan.samples if s.key == image.key)
    assert sample.key.startswith("COCO_") and "." not in sample.key
    assert [c.id for c in sample.captions] == sorted(annotation_id for annotation_id, _ in image.captions)


def test_test_split_keeps_the_karpathy_order(tree, tmp_path):
    index = shard_dataset("coco2014", tree.root, tmp_path / "out")
    keys = list(dict.fromkeys(name.split(".")[0] for name in shard_members(tmp_path / "out") if name.split(".")[0] in
                              {image.key for image in tree.by_split("test")}))
    assert keys == [image.key for image in tree.by_split("test")]
    assert index["splits"]["test"]["shards"][0]["first_key"] == tree.by_split("test")[0].key


def test_txt_collapses_whitespace_and_json_keeps_the_raw_caption_with_its_id(tree, tmp_path):
    shard_dataset("coco2014", tree.root, tmp_path / "out")
    members = shard_members(tmp_path / "out")
    image = next(i for i in tree.images if "\n" in i.captions[1][1])
    lines = members[f"{image.key}.txt"].decode().splitlines()
    assert lines == [" ".join(raw.split()) for _, raw in image.captions]
    meta = json.loads(members[f"{image.key}.json"])
    assert [(c["id"], c["text"]) for c in meta["captions"]] == image.captions
    assert meta["meta"]["cocoid"] == image.cocoid
    assert members[f"{image.key}.jpg"] == tree.image_path(image).read_bytes()


def test_an_image_with_seven_captions_keeps_all_of_them(tree, tmp_path):
    shard_dataset("coco2014", tree.root, tmp_path / "out")
    seven = next(i for i in tree.images if len(i.captions) == 7)
    assert len(shard_members(tmp_path / "out")[f"{seven.key}.txt"].decode().splitlines()) == 7


def test_a_clean_tree_validates_with_the_manifest_counts_as_warnings_only(tree):
    report = validate_dataset("coco2014", tree.root)
    assert report.ok, [p for p in report.problems if p.severity == "error"]
    assert kinds(report, "warning") == ["count_differs"]  # 15 images, the manifest says 123,287
    assert report.counts["images_checked"] == 15


def test_json_that_does_not_parse_is_named_with_its_line(tree, tmp_path):
    path = tree.annotation_file("val2014")
    path.write_text(path.read_text().replace('"annotations": [', '"annotations": [\n{"image_id": 1,, },', 1))
    report = validate_dataset("coco2014", tree.root)
    problem = next(p for p in report.problems if p.kind == "malformed_json")
    assert problem.file == "coco2014/annotations/captions_val2014.json" and problem.line == 2
    assert "line 2, column" in problem.detail
    with pytest.raises(DatasetLayoutError, match="captions_val2014.json"):
        shard_dataset("coco2014", tree.root, tmp_path / "out")


def test_a_missing_image_is_named_and_skipped_by_shard(tree, tmp_path):
    image = tree.by_split("val")[0]
    tree.image_path(image).unlink()
    report = validate_dataset("coco2014", tree.root)
    assert [p.file for p in report.problems if p.kind == "missing_image"] == [f"coco2014/val2014/{image.file_name}"]
    index = shard_dataset("coco2014", tree.root, tmp_path / "out", ShardOptions(max_bad=0.1))
    assert [s["key"] for s in index["skipped"]] == [image.key] and index["splits"]["val"]["samples"] == 2


def test_an_annotation_whose_image_id_is_unknown_is_an_error_listed_in_the_index(tree, tmp_path):
    tree.rewrite_annotations("train2014", lambda data: data["annotations"].append(
        {"image_id": 999, "id": 1, "caption": "an orphan"}))
    report = validate_dataset("coco2014", tree.root)
    problem = next(p for p in report.problems if p.kind == "unknown_image_id")
    assert problem.file == "coco2014/annotations/captions_train2014.json" and "999" in problem.detail
    index = shard_dataset("coco2014", tree.root, tmp_path / "out")
    assert any("unknown_image_id" in line and "999" in line for line in index["annotation_problems"])


def test_an_image_without_captions_is_an_error_and_a_dropped_sample(tree, tmp_path):
    image = tree.by_split("test")[1]
    tree.rewrite_annotations(image.folder, lambda data: data.update(
        annotations=[a for a in data["annotations"] if a["image_id"] != image.cocoid]))
    report = validate_dataset("coco2014", tree.root)
    assert any(p.kind == "no_captions" and image.key in p.detail for p in report.problems)
    index = shard_dataset("coco2014", tree.root, tmp_path / "out", ShardOptions(max_bad=0.1))
    assert index["splits"]["test"]["samples"] == 3
    assert [(s["key"], s["split"]) for s in index["skipped"]] == [(image.key, "test")]
    assert index["totals"]["bad_samples"] == 1


def test_karpathy_entries_missing_from_the_annotations_are_errors(tree):
    image = tree.by_split("val")[0]
    tree.rewrite_annotations(image.folder, lambda data: data.update(
        images=[i for i in data["images"] if i["id"] != image.cocoid],
        annotations=[a for a in data["annotations"] if a["image_id"] != image.cocoid]))
    report = validate_dataset("coco2014", tree.root)
    problem = next(p for p in report.problems if p.kind == "karpathy_unknown_image")
    assert image.file_name in problem.detail and problem.file == "coco2014/dataset_coco.json"
    assert report.counts["val"] == 2


def test_a_karpathy_sentence_that_differs_from_the_annotations_is_a_warning(tree):
    path = tree.dataset_dir / "dataset_coco.json"
    data = json.loads(path.read_text())
    data["images"][3]["sentences"][0]["raw"] = "Something else entirely"
    path.write_text(json.dumps(data))
    report = validate_dataset("coco2014", tree.root)
    problem = next(p for p in report.problems if p.kind == "karpathy_caption_differs")
    assert problem.severity == "warning" and tree.images[3].key in problem.detail
    assert report.ok


def test_an_image_folder_not_downloaded_leaves_its_images_out_with_one_warning(tree, tmp_path):
    shutil.rmtree(tree.dataset_dir / "train2014")
    report = validate_dataset("coco2014", tree.root)
    assert report.ok
    warning = next(p for p in report.problems if p.kind == "part_not_downloaded")
    assert "train2014/" in warning.detail and "--only train" in warning.detail
    assert report.counts["train"] == 2  # restval images come from val2014
    assert report.counts["train2014_left_out"] == 6


def test_coco2017_uses_the_official_splits_and_notes_the_karpathy_overlap(tmp_path):
    tree = build_coco_tree(tmp_path / "data", name="coco2017", spoken=False)
    report = validate_dataset("coco2017", tree.root)
    assert report.ok and "karpathy_overlap" in kinds(report, "info")
    assert (report.counts["train"], report.counts["val"], report.counts["test"]) == (6, 9, 0)
    with pytest.raises(ConfigError, match="coco2014"):
        scan_source("coco2017", tree.root, splits="karpathy")


def test_a_missing_karpathy_file_points_at_official_splits(tree):
    (tree.dataset_dir / "dataset_coco.json").unlink()
    report = validate_dataset("coco2014", tree.root)
    problem = next(p for p in report.problems if p.kind == "missing_file")
    assert "dataset_coco.json" in problem.file and "--splits official" in problem.detail
    assert validate_dataset("coco2014", tree.root, source_options={"splits": "official"}).ok


def test_an_unknown_splits_value_is_refused(tree):
    with pytest.raises(ConfigError, match="karpathy, official"):
        scan_source("coco2014", tree.root, splits="random")


def test_sharding_annotations_without_any_image_folder_is_refused(tree, tmp_path):
    shutil.rmtree(tree.dataset_dir / "train2014")
    shutil.rmtree(tree.dataset_dir / "val2014")
    with pytest.raises(DatasetLayoutError, match="nothing to shard"):
        shard_dataset("coco2014", tree.root, tmp_path / "out")
    assert not (tmp_path / "out" / "index.json").exists()


def test_official_splits_do_not_warn_about_karpathy_split_counts(tree):
    report = validate_dataset("coco2014", tree.root, source_options={"splits": "official"})
    assert not [p for p in report.problems if p.kind == "count_differs" and p.detail.split(":")[0] in ("train", "val", "test")]


def test_a_karpathy_entry_with_null_sentences_is_a_warning_not_a_crash(tree):
    path = tree.dataset_dir / "dataset_coco.json"
    data = json.loads(path.read_text())
    data["images"][0]["sentences"] = None
    data["images"][1]["sentences"][0]["raw"] = None
    path.write_text(json.dumps(data))
    report = validate_dataset("coco2014", tree.root)
    assert report.ok
    assert {p.key for p in report.problems if p.kind == "karpathy_caption_differs"} == {tree.images[0].key, tree.images[1].key}


def test_two_image_ids_with_one_file_name_stop_sharding(tree, tmp_path):
    image = tree.by_split("val")[0]
    tree.rewrite_annotations(image.folder, lambda data: data["images"].append(
        {"id": 777, "file_name": image.file_name, "height": 1, "width": 1}))
    report = validate_dataset("coco2014", tree.root)
    assert any(p.kind == "duplicate_key" and image.file_name in p.detail for p in report.problems)
    with pytest.raises(DatasetLayoutError, match="duplicate|file name"):
        shard_dataset("coco2014", tree.root, tmp_path / "out")


def test_an_annotation_without_a_caption_is_listed_and_does_not_stop_sharding(tree, tmp_path):
    image = tree.by_split("train")[0]
    tree.rewrite_annotations(image.folder, lambda data: data["annotations"].append({"image_id": image.cocoid, "id": 3}))
    report = validate_dataset("coco2014", tree.root)
    assert [p.kind for p in report.problems if p.severity == "error"] == ["bad_annotation"]
    index = shard_dataset("coco2014", tree.root, tmp_path / "out")
    assert any("bad_annotation" in line for line in index["annotation_problems"])
