import json

import pytest

from tests.builders import shard_members
from tests.coco_builders import build_coco_tree
from trimodal.errors import ShardError
from trimodal.pipeline.shard.writer import ShardOptions
from trimodal.pipeline.datasets import shard_dataset
from trimodal.pipeline.sources import scan_source
from trimodal.pipeline.read.shards import read_shard
from trimodal.pipeline.datasets import validate_dataset


@pytest.fixture
def tree(tmp_path):
    return build_coco_tree(tmp_path / "data")


def retarget(tree, image, position, uttid_caption_id=None, text=None):
    """Change the `position`-th utterance of `image` in its SpokenCOCO json: its uttid's caption id, its text."""
    file_name = "SpokenCOCO_train.json" if image.folder.startswith("train") else "SpokenCOCO_val.json"

    def edit(data):
        entry = next(e for e in data["data"] if e["image"].endswith(image.file_name))
        utterance = entry["captions"][position]
        if uttid_caption_id is not None:
            utterance["uttid"] = utterance["uttid"].rsplit("_", 1)[0] + f"_{uttid_caption_id}"
        if text is not None:
            utterance["text"] = text

    tree.rewrite_spoken(file_name, edit)


def test_every_caption_joins_its_utterance_by_caption_id(tree):
    scan = scan_source("coco2014", tree.root)
    assert scan.audio_source == "spokencoco" and scan.modalities == ["image", "text", "audio"]
    assert scan.counts["joined_by_id"] == scan.counts["utterances"] == len(tree.utterances())
    spoken = {u["uttid"].rsplit("_", 1)[1]: u for u in tree.utterances()}
    for sample in scan.samples:
        for caption in sample.captions:
            utterance = spoken[str(caption.id)]
            assert caption.audio == str(tree.spoken_dir / utterance["wav"]) and caption.speaker == utterance["speaker"]


def test_a_transcript_with_a_typo_is_joined_by_its_id(tree):
    typo = next(u for u in tree.utterances() if u["uttid"].endswith(f"_{tree.images[0].captions[0][0]}"))
    assert "PHOTTO" in typo["text"]
    report = validate_dataset("coco2014", tree.root)
    assert report.ok and report.counts["unmatched_utterances"] == 0
    assert not any(p.kind == "joined_by_transcript" for p in report.problems)


def test_a_wrong_id_with_the_same_text_is_joined_by_the_normalised_transcript(tree):
    image = tree.images[2]
    annotation_id, raw = image.captions[3]
    retarget(tree, image, 3, uttid_caption_id=77)
    scan = scan_source("coco2014", tree.root)
    note = next(p for p in scan.problems if p.kind == "joined_by_transcript")
    assert note.severity == "info" and f"caption {annotation_id}" in note.detail
    caption = next(c for s in scan.samples if s.key == image.key for c in s.captions if c.id == annotation_id)
    assert caption.audio is not None and scan.counts["joined_by_transcript"] == 1


def test_a_wrong_id_and_another_text_is_unmatched_listed_and_counted(tree, tmp_path):
    image = tree.images[4]
    annotation_id, _ = image.captions[0]
    retarget(tree, image, 0, uttid_caption_id=77, text="A CAT ON A SOFA")
    report = validate_dataset("coco2014", tree.root)
    problem = next(p for p in report.problems if p.kind == "unmatched_utterance")
    assert problem.severity == "error" and "A CAT ON A SOFA" in problem.detail and problem.file.endswith(".wav")
    assert report.counts["unmatched_utterances"] == 1
    # Never guessed: the caption keeps no recording, and the utterance counts towards --max-bad.
    with pytest.raises(ShardError, match="too many bad inputs"):
        shard_dataset("coco2014", tree.root, tmp_path / "strict")
    index = shard_dataset("coco2014", tree.root, tmp_path / "out", ShardOptions(max_bad=0.05))
    assert index["totals"]["bad_utterances"] == 1
    assert [s["key"] for s in index["skipped"]] == [image.key]
    meta = json.loads(shard_members(tmp_path / "out")[f"{image.key}.json"])
    assert meta["captions"][0]["id"] == annotation_id and meta["captions"][0]["audio"] is None


def test_shards_carry_one_wav_per_caption_position_and_the_speakers(tree, tmp_path):
    index = shard_dataset("coco2014", tree.root, tmp_path / "out")
    assert index["modalities"] == ["image", "text", "audio"] and index["source"]["audio"] == "spokencoco"
    members = shard_members(tmp_path / "out")
    image = next(i for i in tree.images if len(i.captions) == 7)
    meta = json.loads(members[f"{image.key}.json"])
    assert [c["audio"] for c in meta["captions"]] == [f"{n}.wav" for n in range(7)]
    spoken = {int(u["uttid"].rsplit("_", 1)[1]): u for u in tree.utterances()}
    for n, (annotation_id, _) in enumerate(image.captions):
        assert members[f"{image.key}.{n}.wav"] == (tree.spoken_dir / spoken[annotation_id]["wav"]).read_bytes()
        assert meta["captions"][n]["speaker"] == spoken[annotation_id]["speaker"]


def test_reading_the_shards_pairs_each_utterance_with_its_caption_id(tree, tmp_path):
    index = shard_dataset("coco2014", tree.root, tmp_path / "out")
    contents = read_shard(tmp_path / "out" / index["splits"]["test"]["shards"][0]["name"])
    assert contents.wav_caption_ids == contents.caption_ids  # every caption is spoken, in caption order
    assert all(caption_id > 4 for caption_id in contents.caption_ids)  # annotation ids, not positions


def test_a_wav_at_another_rate_is_recorded_not_rejected(tmp_path):
    tree = build_coco_tree(tmp_path / "data", wav_rate=22_050)
    report = validate_dataset("coco2014", tree.root)
    assert report.ok
    assert report.counts["wavs at 22050 Hz, 1 channel(s), 16-bit PCM"] == len(tree.utterances())
    index = shard_dataset("coco2014", tree.root, tmp_path / "out")
    assert index["totals"]["bad_utterances"] == 0


def test_featurize_resamples_a_wav_at_another_rate_to_16khz_frames(tmp_path):
    from trimodal.features.audio import MelConfig, MelExtractor

    tree = build_coco_tree(tmp_path / "data", wav_rate=22_050)
    index = shard_dataset("coco2014", tree.root, tmp_path / "out")
    contents = read_shard(tmp_path / "out" / index["splits"]["val"]["shards"][0]["name"])
    mels = MelExtractor().from_bytes(contents.wavs[:3])
    assert [len(mel) for mel in mels] == [MelConfig().frames(int(0.1 * 16_000))] * 3


def test_a_truncated_wav_is_an_error_and_a_skipped_utterance(tree, tmp_path):
    wav = tree.spoken_dir / tree.utterances()[5]["wav"]
    wav.write_bytes(wav.read_bytes()[:400])
    report = validate_dataset("coco2014", tree.root)
    assert [p.kind for p in report.problems if p.file.endswith(wav.name)] == ["truncated_wav"]
    index = shard_dataset("coco2014", tree.root, tmp_path / "out", ShardOptions(max_bad=0.05))
    assert index["totals"]["bad_utterances"] == 1


def test_utterances_of_an_image_in_no_annotation_file_are_unmatched(tree):
    tree.rewrite_spoken("SpokenCOCO_val.json", lambda data: data["data"].append(
        {"image": "val2014/COCO_val2014_000000000042.jpg",
         "captions": [{"text": "A DOG", "speaker": "m1", "uttid": "m1-X_42_1", "wav": "wavs/val/0/m1-X_42_1.wav"}]}))
    report = validate_dataset("coco2014", tree.root)
    problem = next(p for p in report.problems if p.kind == "unmatched_utterance")
    assert "COCO_val2014_000000000042.jpg" in problem.detail


def test_spokencoco_is_read_only_through_coco2014(tree):
    from trimodal.errors import DatasetLayoutError

    with pytest.raises(DatasetLayoutError, match="joins coco2014"):
        scan_source("spokencoco", tree.root)


def test_malformed_spokencoco_json_is_named(tree):
    path = tree.spoken_dir / "SpokenCOCO_val.json"
    path.write_text(path.read_text()[:-10])
    report = validate_dataset("coco2014", tree.root)
    problem = next(p for p in report.problems if p.kind == "malformed_json")
    assert problem.file == "spokencoco/SpokenCOCO/SpokenCOCO_val.json" and problem.line == 1


def test_coco2017_under_the_same_root_does_not_join_spokencoco(tree):
    build_coco_tree(tree.root, name="coco2017", spoken=False)
    scan = scan_source("coco2017", tree.root)
    assert scan.audio_source is None and not any(p.kind == "unmatched_utterance" for p in scan.problems)


def test_a_spokencoco_file_without_entries_is_an_error_not_silence(tree):
    (tree.spoken_dir / "SpokenCOCO_train.json").write_text('{"data": []}')
    report = validate_dataset("coco2014", tree.root)
    problem = next(p for p in report.problems if p.kind == "malformed_json")
    assert problem.file.endswith("SpokenCOCO_train.json") and "no 'data' list" in problem.detail


def test_an_utterance_without_a_wav_path_drops_only_that_utterance(tree, tmp_path):
    tree.rewrite_spoken("SpokenCOCO_val.json", lambda data: data["data"][0]["captions"][0].pop("wav"))
    report = validate_dataset("coco2014", tree.root)
    assert [p.kind for p in report.problems if p.severity == "error"] == ["bad_utterance"]
    index = shard_dataset("coco2014", tree.root, tmp_path / "out", ShardOptions(max_bad=0.05))
    assert index["totals"]["bad_utterances"] == 1


def test_captions_without_a_recording_are_counted(tree):
    tree.rewrite_spoken("SpokenCOCO_val.json", lambda data: data["data"][0]["captions"].pop())
    report = validate_dataset("coco2014", tree.root)
    assert report.ok and report.counts["split_captions_without_audio"] == 1
