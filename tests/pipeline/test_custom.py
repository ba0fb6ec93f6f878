import json
import zlib
from pathlib import Path

import pytest

from tests.builders import make_jpeg, make_wav, shard_members
from trimodal.errors import DatasetLayoutError, ShardError
from trimodal.pipeline.shard.writer import ShardOptions
from trimodal.pipeline.read.index import INDEX
from trimodal.pipeline.datasets import shard_dataset
from trimodal.pipeline.datasets import validate_dataset

# Each split's metadata rows as (image_filename, caption); beach.jpg's rows are not adjacent on purpose.
FOLDER_ROWS = {
    "train": [("beach.jpg", "a dog runs on the beach"), ("kite.jpg", "a red kite in the sky"),
              ("beach.jpg", "waves behind a running dog"), ("street.jpg", "a busy street at night"),
              ("beach.jpg", "a sandy beach")],
    "val": [("park.jpg", "children in a park"), ("park.jpg", "a green park")],
    "test": [("harbour.jpg", "boats in a harbour"), ("harbour.jpg", "a quiet harbour")],
}


def image_bytes(name: str) -> bytes:
    return make_jpeg(zlib.crc32(name.encode()), size=(16, 12))


def build_folder(root: Path, rows: dict = FOLDER_ROWS, spoken: tuple = ("train", "val")) -> Path:
    """DIR/metadata/<split>_metadata.json with images/<split>/ and, for the `spoken` splits, audio/<split>/."""
    (root / "metadata").mkdir(parents=True)
    for split, split_rows in rows.items():
        (root / "images" / split).mkdir(parents=True)
        entries = []
        for number, (image, caption) in enumerate(split_rows):
            (root / "images" / split / image).write_bytes(image_bytes(image))
            entry = {"id": f"{split}-{number}", "caption": caption, "image_filename": image}
            if split in spoken:
                (root / "audio" / split).mkdir(parents=True, exist_ok=True)
                entry["audio_filename"] = f"{Path(image).stem}_{number}.wav"
                (root / "audio" / split / entry["audio_filename"]).write_bytes(make_wav(0.1, seed=number))
            entries.append(entry)
        (root / "metadata" / f"{split}_metadata.json").write_text(json.dumps(entries, indent=1), encoding="utf-8")
    return root


def write_lines(path: Path, lines: list) -> Path:
    """A JSONL file: dicts are dumped, strings written as they are."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines),
                    encoding="utf-8")
    return path


def append_line(manifest: Path, line) -> int:
    """Add one line to a manifest; returns its line number."""
    number = len(manifest.read_text(encoding="utf-8").splitlines()) + 1
    with open(manifest, "a", encoding="utf-8") as writer:
        writer.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return number


def build_manifest(folder: Path) -> Path:
    """folder/data.jsonl: four samples, images under pictures/ and wavs under speech/ beside it."""
    (folder / "pictures").mkdir(parents=True)
    (folder / "speech").mkdir()
    for name in ("dog.1.jpg", "IMG_0002.jpg", "bird.jpg", "fish.jpg"):
        (folder / "pictures" / name).write_bytes(image_bytes(name))
    for number, name in enumerate(("dog_0.wav", "dog_1.wav", "cat_0.wav", "bird_1.wav")):
        (folder / "speech" / name).write_bytes(make_wav(0.1, seed=number))
    return write_lines(folder / "data.jsonl", [
        {"image": "pictures/dog.1.jpg", "captions": ["a dog", "a brown dog"],
         "audio": ["speech/dog_0.wav", "speech/dog_1.wav"], "split": "train"},
        {"key": "cat", "image": "pictures/IMG_0002.jpg", "captions": ["a cat asleep"], "audio": ["speech/cat_0.wav"],
         "split": "train"},
        {"image": "pictures/bird.jpg", "captions": ["a bird", "a small bird singing"], "audio": [None, "speech/bird_1.wav"],
         "split": "val"},
        {"image": "pictures/fish.jpg", "captions": ["a fish"], "split": "test"},
    ])


@pytest.fixture
def folder(tmp_path) -> Path:
    return build_folder(tmp_path / "mine")


@pytest.fixture
def manifest(tmp_path) -> Path:
    return build_manifest(tmp_path / "mine")


def shard_folder(root: Path, out: Path, options: ShardOptions = ShardOptions()) -> dict:
    return shard_dataset("custom", root, out, options, source_options={"manifest": None})


def shard_manifest(manifest: Path, out: Path, options: ShardOptions = ShardOptions()) -> dict:
    return shard_dataset("custom", None, out, options, source_options={"manifest": manifest})


def validate_manifest(manifest: Path):
    return validate_dataset("custom", None, source_options={"manifest": manifest})


def problems_of(report, kind: str) -> list:
    return [problem for problem in report.problems if problem.kind == kind]


# The metadata folder.

def test_a_clean_folder_validates_ok(folder):
    report = validate_dataset("custom", folder)
    assert report.ok, [p for p in report.problems if p.severity == "error"]
    assert (report.counts["train"], report.counts["val"], report.counts["test"]) == (3, 1, 1)
    assert report.counts["images_checked"] == 5 and report.counts["wavs_checked"] == 7


def test_rows_sharing_an_image_become_one_sample_with_all_captions_in_row_order(folder, tmp_path):
    shard_folder(folder, tmp_path / "out")
    members = shard_members(tmp_path / "out")
    assert members["beach.txt"].decode().splitlines() == [
        "a dog runs on the beach", "waves behind a running dog", "a sandy beach"]
    meta = json.loads(members["beach.json"])
    assert meta["meta"]["row_ids"] == ["train-0", "train-2", "train-4"]


def test_the_metadata_files_give_the_train_val_and_test_splits(folder, tmp_path):
    index = shard_folder(folder, tmp_path / "out")
    assert {split: info["samples"] for split, info in index["splits"].items()} == {"train": 3, "val": 1, "test": 1}
    assert {split: info["captions"] for split, info in index["splits"].items()} == {"train": 5, "val": 2, "test": 2}
    assert json.loads(shard_members(tmp_path / "out")["park.json"])["split"] == "val"


def test_a_sample_is_stored_as_key_txt_json_and_a_wav_per_caption_position(folder, tmp_path):
    shard_folder(folder, tmp_path / "out")
    members = shard_members(tmp_path / "out")
    assert sorted(name for name in members if name.startswith("beach.")) == [
        "beach.0.wav", "beach.1.wav", "beach.2.wav", "beach.jpg", "beach.json", "beach.txt"]
    meta = json.loads(members["beach.json"])
    assert [caption["audio"] for caption in meta["captions"]] == ["0.wav", "1.wav", "2.wav"]
    assert members["beach.1.wav"] == (folder / "audio" / "train" / "beach_2.wav").read_bytes()


def test_image_bytes_in_the_shards_are_those_of_the_source(folder, tmp_path):
    shard_folder(folder, tmp_path / "out")
    members = shard_members(tmp_path / "out")
    for split, image in (("train", "kite.jpg"), ("val", "park.jpg"), ("test", "harbour.jpg")):
        assert members[image] == (folder / "images" / split / image).read_bytes()


def test_a_split_without_audio_filenames_gives_text_only_samples(folder, tmp_path):
    index = shard_folder(folder, tmp_path / "out")
    members = shard_members(tmp_path / "out")
    assert index["splits"]["test"]["utterances"] == 0 and index["splits"]["val"]["utterances"] == 2
    assert {"harbour.jpg", "harbour.txt", "harbour.json"} == {n for n in members if n.startswith("harbour.")}
    assert index["modalities"] == ["image", "text", "audio"] and index["skipped"] == []


def test_a_folder_without_any_audio_is_image_and_text(tmp_path):
    root = build_folder(tmp_path / "mine", spoken=())
    index = shard_folder(root, tmp_path / "out")
    assert index["modalities"] == ["image", "text"]
    assert not any(name.endswith(".wav") for name in shard_members(tmp_path / "out"))


def test_a_dataset_folder_named_custom_under_root_is_found(tmp_path):
    build_folder(tmp_path / "data" / "custom")
    assert validate_dataset("custom", tmp_path / "data").ok


def test_mm_shard_custom_root_writes_shards_and_index(folder, tmp_path, mm):
    result = mm("shard", "custom", "--root", folder, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "out" / INDEX).read_text())
    assert index["dataset"] == "custom" and index["splits"]["train"]["samples"] == 3


def test_a_metadata_row_without_a_caption_is_named_by_its_row(folder):
    rows = json.loads((folder / "metadata" / "train_metadata.json").read_text())
    rows[3]["caption"] = " "
    (folder / "metadata" / "train_metadata.json").write_text(json.dumps(rows))
    [problem] = problems_of(validate_dataset("custom", folder), "no_caption")
    assert problem.file == "metadata/train_metadata.json"
    assert "row 4" in problem.detail and "train-3" in problem.detail and "street.jpg" in problem.detail


def test_a_metadata_file_of_an_unknown_split_counts_each_of_its_images_as_bad(folder, tmp_path):
    (folder / "metadata" / "holdout_metadata.json").write_text(json.dumps([
        {"id": 1, "caption": "a", "image_filename": "x.jpg"}, {"id": 2, "caption": "b", "image_filename": "y.jpg"},
        {"id": 3, "caption": "c", "image_filename": "x.jpg"}]))
    problems = problems_of(validate_dataset("custom", folder), "unknown_split")
    assert [p.file for p in problems] == ["metadata/holdout_metadata.json"] * 2 and "'holdout'" in problems[0].detail
    index = shard_folder(folder, tmp_path / "out", ShardOptions(max_bad=0.5))
    assert index["totals"]["bad_samples"] == 2 and {s["key"] for s in index["skipped"]} == {"x", "y"}


def test_a_metadata_file_that_is_not_a_json_list_stops_sharding(folder, tmp_path):
    rows = json.loads((folder / "metadata" / "val_metadata.json").read_text())
    (folder / "metadata" / "val_metadata.json").write_text(json.dumps({"data": rows}))
    [problem] = problems_of(validate_dataset("custom", folder), "malformed_json")
    assert problem.file == "metadata/val_metadata.json" and "not a JSON list" in problem.detail
    with pytest.raises(DatasetLayoutError, match="val_metadata.json"):
        shard_folder(folder, tmp_path / "out")


def test_macos_resource_forks_beside_the_metadata_are_not_splits(folder):
    (folder / "metadata" / "._train_metadata.json").write_bytes(b"\x00\x05\x16\x07resource fork")
    assert validate_dataset("custom", folder).ok


def test_an_image_name_that_is_not_ascii_is_a_bad_key_and_drops_its_sample(tmp_path):
    rows = {**FOLDER_ROWS, "test": [("café.jpg", "a cup of coffee")]}
    root = build_folder(tmp_path / "mine", rows)
    [problem] = problems_of(validate_dataset("custom", root), "bad_key")
    assert problem.file == "metadata/test_metadata.json" and "not printable ASCII" in problem.detail
    index = shard_folder(root, tmp_path / "out", ShardOptions(max_bad=0.5))
    assert [(s["split"], s["key"], s["reason"].split(":")[0]) for s in index["skipped"]] == [("test", "café", "bad key")]


# The JSONL manifest.

def test_a_clean_manifest_validates_ok(manifest):
    report = validate_manifest(manifest)
    assert report.ok, [p for p in report.problems if p.severity == "error"]
    assert (report.counts["train"], report.counts["val"], report.counts["test"]) == (2, 1, 1)


def test_manifest_keys_come_from_key_or_else_the_image_stem(manifest, tmp_path):
    shard_manifest(manifest, tmp_path / "out")
    keys = {name.split(".")[0] for name in shard_members(tmp_path / "out")}
    assert keys == {"dog_1", "cat", "bird", "fish"}  # dog.1.jpg: dots in a stem become underscores


def test_manifest_paths_are_relative_to_the_manifest_not_the_working_folder(manifest, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    index = shard_manifest(manifest, tmp_path / "out")
    members = shard_members(tmp_path / "out")
    assert index["skipped"] == []
    assert members["cat.jpg"] == (manifest.parent / "pictures" / "IMG_0002.jpg").read_bytes()
    assert members["cat.0.wav"] == (manifest.parent / "speech" / "cat_0.wav").read_bytes()


def test_a_null_in_the_audio_list_leaves_that_caption_unspoken(manifest, tmp_path):
    index = shard_manifest(manifest, tmp_path / "out")
    members = shard_members(tmp_path / "out")
    assert "bird.0.wav" not in members and members["bird.1.wav"] == (manifest.parent / "speech" / "bird_1.wav").read_bytes()
    assert [c["audio"] for c in json.loads(members["bird.json"])["captions"]] == [None, "1.wav"]
    assert index["splits"]["val"]["captions"] == 2 and index["splits"]["val"]["utterances"] == 1


def test_a_line_without_an_audio_list_gives_a_text_only_sample(manifest, tmp_path):
    index = shard_manifest(manifest, tmp_path / "out")
    assert {n for n in shard_members(tmp_path / "out") if n.startswith("fish.")} == {"fish.jpg", "fish.txt", "fish.json"}
    assert index["splits"]["test"]["utterances"] == 0


def test_a_blank_caption_in_a_manifest_is_reported_and_left_out(manifest, tmp_path):
    line = append_line(manifest, {"image": "pictures/fish.jpg", "key": "fish2", "captions": ["  ", "a second fish"],
                                  "split": "test"})
    [problem] = problems_of(validate_manifest(manifest), "no_caption")
    assert (problem.file, problem.line) == ("data.jsonl", line) and "caption 0" in problem.detail
    shard_manifest(manifest, tmp_path / "out")
    members = shard_members(tmp_path / "out")
    assert members["fish2.txt"] == b"a second fish\n" and json.loads(members["fish2.json"])["captions"][0]["id"] == 1


def test_mm_shard_custom_manifest_writes_shards_and_index(manifest, tmp_path, mm):
    result = mm("shard", "custom", "--manifest", manifest, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "out" / INDEX).read_text())
    assert {split: info["samples"] for split, info in index["splits"].items()} == {"train": 2, "val": 1, "test": 1}


def test_mm_validate_custom_manifest_passes_a_clean_manifest(manifest, mm):
    result = mm("validate", "custom", "--manifest", manifest)
    assert result.exit_code == 0, result.output
    assert "ok" in result.out


# Bad lines of a manifest, and --max-bad.

def test_a_missing_image_is_named_by_validate(manifest):
    append_line(manifest, {"image": "pictures/gone.jpg", "captions": ["nothing here"], "split": "val"})
    report = validate_manifest(manifest)
    [problem] = problems_of(report, "missing_image")
    assert not report.ok and problem.severity == "error" and problem.file == "pictures/gone.jpg"


def test_a_missing_image_is_skipped_by_shard_and_listed(manifest, tmp_path):
    append_line(manifest, {"image": "pictures/gone.jpg", "captions": ["nothing here"], "split": "val"})
    index = shard_manifest(manifest, tmp_path / "out", ShardOptions(max_bad=0.5))
    assert index["skipped"] == [{"split": "val", "key": "gone", "file": "pictures/gone.jpg", "reason": "image missing"}]
    assert index["splits"]["val"]["samples"] == 1 and index["totals"]["bad_samples"] == 1
    assert not any(name.startswith("gone.") for name in shard_members(tmp_path / "out"))


def test_a_line_without_captions_is_a_no_captions_error_at_its_line(manifest):
    line = append_line(manifest, {"image": "pictures/fish.jpg", "key": "silent", "captions": [], "split": "train"})
    [problem] = problems_of(validate_manifest(manifest), "no_captions")
    assert (problem.severity, problem.file, problem.line) == ("error", "data.jsonl", line)


def test_a_line_without_captions_drops_its_sample_and_counts_towards_max_bad(manifest, tmp_path):
    append_line(manifest, {"image": "pictures/fish.jpg", "key": "silent", "captions": [], "split": "train"})
    index = shard_manifest(manifest, tmp_path / "out", ShardOptions(max_bad=0.5))
    assert index["totals"]["planned_samples"] == 5 and index["totals"]["bad_samples"] == 1
    assert [(s["split"], s["key"]) for s in index["skipped"]] == [("train", "silent")]
    assert not any(name.startswith("silent.") for name in shard_members(tmp_path / "out"))


def test_an_unknown_split_is_an_error_at_its_line(manifest):
    line = append_line(manifest, {"image": "pictures/fish.jpg", "key": "odd", "captions": ["x"], "split": "holdout"})
    [problem] = problems_of(validate_manifest(manifest), "unknown_split")
    assert (problem.severity, problem.file, problem.line) == ("error", "data.jsonl", line)
    assert "'holdout'" in problem.detail


def test_an_unknown_split_drops_its_sample_and_counts_towards_max_bad(manifest, tmp_path):
    append_line(manifest, {"image": "pictures/fish.jpg", "key": "odd", "captions": ["x"], "split": "holdout"})
    index = shard_manifest(manifest, tmp_path / "out", ShardOptions(max_bad=0.5))
    assert index["totals"]["bad_samples"] == 1 and [s["key"] for s in index["skipped"]] == ["odd"]


def test_a_malformed_line_is_an_error_at_its_line(manifest):
    line = append_line(manifest, '{"image": "pictures/fish.jpg", "captions": ["x"')
    [problem] = problems_of(validate_manifest(manifest), "malformed_line")
    assert (problem.severity, problem.file, problem.line) == ("error", "data.jsonl", line)


def test_a_malformed_line_stops_sharding_before_anything_is_written(manifest, tmp_path):
    line = append_line(manifest, "not json at all")
    with pytest.raises(DatasetLayoutError, match=rf"data.jsonl:{line}: not a JSON object"):
        shard_manifest(manifest, tmp_path / "out", ShardOptions(max_bad=1.0))
    assert not (tmp_path / "out").exists()


def test_a_duplicate_key_is_an_error_naming_both_images(manifest):
    (manifest.parent / "pictures" / "dog_1.jpg").write_bytes(image_bytes("dog_1.jpg"))
    line = append_line(manifest, {"image": "pictures/dog_1.jpg", "captions": ["another dog"], "split": "test"})
    [problem] = problems_of(validate_manifest(manifest), "duplicate_key")
    assert (problem.severity, problem.file, problem.line) == ("error", "data.jsonl", line)
    assert "'dog_1'" in problem.detail and "pictures/dog.1.jpg" in problem.detail and "pictures/dog_1.jpg" in problem.detail


def test_a_duplicate_key_stops_sharding(manifest, tmp_path):
    append_line(manifest, {"key": "cat", "image": "pictures/fish.jpg", "captions": ["not a cat"], "split": "val"})
    with pytest.raises(DatasetLayoutError, match="key 'cat'"):
        shard_manifest(manifest, tmp_path / "out", ShardOptions(max_bad=1.0))
    assert not (tmp_path / "out" / INDEX).exists()


def test_past_max_bad_shard_fails_and_writes_no_index(manifest, tmp_path):
    append_line(manifest, {"image": "pictures/gone.jpg", "captions": ["nothing here"], "split": "val"})
    with pytest.raises(ShardError, match=r"1 of 5 samples .* more than --max-bad 0.001.*gone"):
        shard_manifest(manifest, tmp_path / "out")
    assert not (tmp_path / "out" / INDEX).exists()


def test_within_max_bad_the_index_lists_every_skipped_item(manifest, tmp_path):
    append_line(manifest, {"image": "pictures/gone.jpg", "captions": ["nothing here"], "split": "val"})
    append_line(manifest, {"image": "pictures/fish.jpg", "key": "silent", "captions": [], "split": "train"})
    append_line(manifest, {"image": "pictures/fish.jpg", "key": "odd", "captions": ["x"], "split": "holdout"})
    index = shard_manifest(manifest, tmp_path / "out", ShardOptions(max_bad=0.5))
    assert [(s["key"], s["file"]) for s in index["skipped"]] == [
        ("gone", "pictures/gone.jpg"), ("odd", "data.jsonl"), ("silent", "data.jsonl")]
    assert index["totals"]["planned_samples"] == 7 and index["totals"]["bad_samples"] == 3


# The command line.

def test_mm_validate_custom_without_root_or_manifest_is_one_error_line(mm):
    result = mm("validate", "custom")
    assert result.exit_code != 0
    assert len(result.err.strip().splitlines()) == 1 and result.err.startswith("error:") and "--root" in result.err
    assert "Traceback" not in result.output


def test_mm_validate_custom_with_a_missing_manifest_is_one_error_line(tmp_path, mm):
    result = mm("validate", "custom", "--manifest", tmp_path / "nope.jsonl")
    assert result.exit_code != 0
    assert result.err.strip() == f"error: --manifest {tmp_path / 'nope.jsonl'} does not exist"
    assert "Traceback" not in result.output


def test_a_manifest_key_with_a_slash_is_a_bad_key_not_a_merged_sample(manifest):
    line = append_line(manifest, {"key": "a/x", "image": "pictures/fish.jpg", "captions": ["a fish again"], "split": "test"})
    problems = problems_of(validate_manifest(manifest), "bad_key")
    assert [(p.line, p.key) for p in problems] == [(line, "a/x")] and "slash" in problems[0].detail


def test_audio_without_a_wav_suffix_is_stored_as_a_wav_member(manifest, tmp_path):
    speech = manifest.parent / "speech"
    (speech / "clip").write_bytes((speech / "dog_0.wav").read_bytes())
    append_line(manifest, {"image": "pictures/fish.jpg", "key": "fish2", "captions": ["one more fish"],
                           "audio": ["speech/clip"], "split": "test"})
    shard_manifest(manifest, tmp_path / "out")
    assert shard_members(tmp_path / "out")["fish2.0.wav"] == (speech / "clip").read_bytes()
