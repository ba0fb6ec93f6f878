import shutil
import time

import pytest

from tests.builders import QUIRK_STEM, build_flickr_tree, make_wav
from trimodal.errors import DatasetLayoutError
from trimodal.pipeline.datasets import validate_dataset


def kinds(report, severity="error"):
    return sorted({p.kind for p in report.problems if p.severity == severity})


@pytest.fixture
def tree(tmp_path):
    return build_flickr_tree(tmp_path)


def test_a_clean_tree_is_ok(tree):
    report = validate_dataset("flickr8k", tree.root)
    assert report.ok, [p for p in report.problems if p.severity == "error"]
    assert report.counts["images_checked"] == 14 and report.counts["wavs_checked"] == 70
    assert (report.counts["train"], report.counts["val"], report.counts["test"]) == (8, 3, 3)


def test_the_jpg1_quirk_is_information_not_an_error(tree):
    report = validate_dataset("flickr8k", tree.root)
    quirks = [p for p in report.problems if p.kind == "quirk_key"]
    assert len(quirks) == 1 and quirks[0].severity == "info" and QUIRK_STEM in quirks[0].detail
    assert quirks[0].line == 76  # 15 images x 5 captions, then the quirk line


def test_images_outside_the_splits_are_information(tree):
    report = validate_dataset("flickr8k", tree.root)
    outside = [p for p in report.problems if p.kind == "image_outside_splits"]
    assert [p.severity for p in outside] == ["info"] and tree.outside[0] in outside[0].file


def test_counts_that_differ_from_the_manifest_are_warnings(tree):
    report = validate_dataset("flickr8k", tree.root)
    assert report.ok and "count_differs" in kinds(report, "warning")


def test_a_missing_image_is_named(tree):
    key = tree.splits["test"][1]
    tree.image(key).unlink()
    report = validate_dataset("flickr8k", tree.root)
    assert not report.ok
    [problem] = [p for p in report.problems if p.kind == "missing_image"]
    assert problem.file == f"flickr8k/Flicker8k_Dataset/{key}.jpg"


def test_a_truncated_jpg_is_caught(tree):
    key = tree.splits["train"][0]
    data = tree.image(key).read_bytes()
    tree.image(key).write_bytes(data[: len(data) // 2])
    report = validate_dataset("flickr8k", tree.root)
    [problem] = [p for p in report.problems if p.kind == "corrupt_image"]
    assert key in problem.file and "truncated" in problem.detail


def test_a_truncated_wav_is_caught(tree):
    key = tree.splits["val"][0]
    wav = tree.wav(key, 2)
    wav.write_bytes(wav.read_bytes()[:-1000])
    report = validate_dataset("flickr8k", tree.root)
    [problem] = [p for p in report.problems if p.kind == "truncated_wav"]
    assert problem.file == f"facc/flickr_audio/wavs/{key}_2.wav" and "header declares" in problem.detail


@pytest.mark.parametrize("wav", [make_wav(rate=44_100), make_wav(channels=2), b"RIFF\x00\x00\x00\x00WAVEjunk"])
def test_wavs_that_are_not_16khz_mono_16bit_or_unreadable_are_errors(tree, wav):
    key = tree.splits["train"][3]
    tree.wav(key, 0).write_bytes(wav)
    report = validate_dataset("flickr8k", tree.root)
    assert set(kinds(report)) & {"bad_wav_format", "corrupt_wav"}
    assert any(f"{key}_0.wav" in p.file for p in report.problems if p.severity == "error")


def test_a_missing_wav_is_named(tree):
    key = tree.splits["train"][1]
    tree.wav(key, 4).unlink()
    report = validate_dataset("flickr8k", tree.root)
    [problem] = [p for p in report.problems if p.kind == "missing_wav"]
    assert problem.file.endswith(f"{key}_4.wav")


def test_a_caption_line_without_its_tab_names_file_and_line(tree):
    lines = tree.token_file.read_text().splitlines(keepends=True)
    lines[6] = lines[6].replace("\t", " ")
    tree.token_file.write_text("".join(lines))
    report = validate_dataset("flickr8k", tree.root)
    [problem] = [p for p in report.problems if p.kind == "malformed_line"]
    assert (problem.file, problem.line) == ("flickr8k/Flickr8k.token.txt", 7)
    assert "missing_caption" in kinds(report)  # that caption is now missing for its image


def test_a_malformed_wav2capt_line_names_file_and_line(tree):
    capt = tree.facc_dir / "wav2capt.txt"
    lines = capt.read_text().splitlines(keepends=True)
    lines[3] = "garbage\n"
    capt.write_text("".join(lines))
    report = validate_dataset("flickr8k", tree.root)
    problem = next(p for p in report.problems if p.kind == "malformed_line")
    assert (problem.file, problem.line) == ("facc/flickr_audio/wav2capt.txt", 4)


def test_a_missing_split_file_is_an_error(tree):
    (tree.dataset_dir / "Flickr_8k.devImages.txt").unlink()
    report = validate_dataset("flickr8k", tree.root)
    assert any(p.kind == "missing_file" and "devImages" in p.file for p in report.problems)


def test_text_files_in_a_flickr8k_text_folder_are_found(tree):
    text_dir = tree.dataset_dir / "Flickr8k_text"
    text_dir.mkdir()
    for path in tree.dataset_dir.glob("*.txt"):
        shutil.move(path, text_dir / path.name)
    assert validate_dataset("flickr8k", tree.root).ok


def test_the_kaggle_repack_with_images_and_captions_txt_is_read(tree):
    (tree.dataset_dir / "Flicker8k_Dataset").rename(tree.dataset_dir / "Images")
    rows = ["image,caption"]
    for line in tree.token_file.read_text().splitlines():
        key, text = line.split("\t")
        if QUIRK_STEM not in key:  # the re-pack drops that image entirely (40,455 captions)
            rows.append(f"{key.split('#')[0]},{text}" if "," not in text else f'{key.split("#")[0]},"{text}"')
    tree.token_file.unlink()
    (tree.dataset_dir / "captions.txt").write_text("\n".join(rows) + "\n")
    report = validate_dataset("flickr8k", tree.root)
    assert report.ok, [p for p in report.problems if p.severity == "error"]
    assert report.counts["captioned_images"] == 15


def test_a_missing_dataset_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetLayoutError, match="does not exist; run `mm download flickr8k"):
        validate_dataset("flickr8k", tmp_path)


def test_without_facc_only_images_and_captions_are_checked(tmp_path):
    tree = build_flickr_tree(tmp_path, facc=False)
    report = validate_dataset("flickr8k", tree.root)
    assert report.ok and report.counts["wavs_checked"] == 0


@pytest.mark.slow
def test_a_tree_of_the_real_size_validates_in_under_a_minute(tmp_path):
    tree = build_flickr_tree(tmp_path, train=6000, val=1000, test=1000, outside=91, image_size=(200, 150),
                             wav_seconds=0.05)
    started = time.monotonic()
    report = validate_dataset("flickr8k", tree.root, workers=2)
    elapsed = time.monotonic() - started
    assert report.ok
    assert report.counts["images"] == 8091 and report.counts["wavs_checked"] == 40000
    assert elapsed < 60, f"validate took {elapsed:.1f} s"
    print(f"validated 8,091 images and 40,000 wavs in {elapsed:.1f} s")
