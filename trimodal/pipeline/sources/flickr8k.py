"""Flickr8k (+ FACC) as unpacked on disk -> Samples, one per split image.

Reads the layout `Flickr8k_Dataset.zip` and `Flickr8k_text.zip` unpack to (text files at the root or in
`Flickr8k_text/`), the Kaggle re-pack (`Images/` + `captions.txt`), and FACC's `flickr_audio/` either
inside the dataset folder (the mini dataset) or as the sibling download `ROOT/facc/flickr_audio/`.
Only annotation files are parsed here; whether images and wavs decode is checked by the caller.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from trimodal.errors import DatasetLayoutError
from trimodal.pipeline.base.checks import PCM_16K_MONO
from trimodal.pipeline.download.manifest import load_manifest
from trimodal.pipeline.base.samples import SPLITS, Caption, Problem, Sample
from trimodal.pipeline.base.scan import Scan
from trimodal.pipeline.sources import register_source

IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images")
TEXT_DIRS = (".", "Flickr8k_text")
TOKEN_FILE = "Flickr8k.token.txt"
KAGGLE_CAPTIONS = "captions.txt"
SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt", "test": "Flickr_8k.testImages.txt"}
FACC_DIR = "flickr_audio"

_TOKEN_KEY = re.compile(r"(?P<stem>[^#\s/]+?)\.jpg(?P<quirk>\.\d+)?#(?P<n>\d+)")
_SPLIT_LINE = re.compile(r"(?P<stem>[^#\s/]+)\.jpg")
_WAV_NAME = re.compile(r"(?P<stem>[^\s/]+)_(?P<n>\d+)\.wav")


@dataclass
class Layout:
    dataset_dir: Path
    image_dir: Path | None = None
    captions_file: Path | None = None
    split_files: dict[str, Path] = field(default_factory=dict)
    facc_dir: Path | None = None


def find_layout(root: Path, name: str) -> Layout:
    dataset_dir = root / name
    if not dataset_dir.is_dir():
        raise DatasetLayoutError(f"{dataset_dir} does not exist; run `mm download {name} --root {root}` first")
    layout = Layout(dataset_dir)
    layout.image_dir = next((dataset_dir / d for d in IMAGE_DIRS if (dataset_dir / d).is_dir()), None)
    text_dirs = [dataset_dir / d for d in TEXT_DIRS]
    layout.captions_file = next((d / TOKEN_FILE for d in text_dirs if (d / TOKEN_FILE).is_file()), None)
    if layout.captions_file is None and (dataset_dir / KAGGLE_CAPTIONS).is_file():
        layout.captions_file = dataset_dir / KAGGLE_CAPTIONS
    for split, file_name in SPLIT_FILES.items():
        found = next((d / file_name for d in text_dirs if (d / file_name).is_file()), None)
        if found:
            layout.split_files[split] = found
    for candidate in (dataset_dir / FACC_DIR, root / "facc" / FACC_DIR):
        if (candidate / "wav2capt.txt").is_file():
            layout.facc_dir = candidate
            break
    return layout


@register_source("flickr8k")
def scan(root: Path, name: str = "flickr8k") -> Scan:
    """Parse the annotation files under `root/name` (and FACC's, when present)."""
    root = Path(root)
    layout = find_layout(root, name)
    problems: list[Problem] = []
    counts: dict[str, int] = {}
    shown = lambda path: os.path.relpath(path, root)  # noqa: E731 - paths in problems are relative to root

    if layout.image_dir is None:
        problems.append(Problem("missing_file", "error", shown(layout.dataset_dir),
                                detail=f"no image folder (looked for {', '.join(d + '/' for d in IMAGE_DIRS)})"))
        image_stems: set[str] = set()
    else:
        image_stems = {entry.name[:-4] for entry in os.scandir(layout.image_dir)
                       if entry.name.endswith(".jpg") and not entry.name.startswith(".")}
    counts["images"] = len(image_stems)

    if layout.captions_file is None:
        problems.append(Problem("missing_file", "error", shown(layout.dataset_dir / TOKEN_FILE),
                                detail=f"no {TOKEN_FILE} (looked in {' and '.join(TEXT_DIRS)}) and no {KAGGLE_CAPTIONS}"))
        captions: dict[str, dict[int, str]] = {}
    elif layout.captions_file.name == KAGGLE_CAPTIONS:
        captions = _parse_kaggle_captions(layout.captions_file, shown(layout.captions_file), problems, counts)
    else:
        captions = _parse_token_file(layout.captions_file, shown(layout.captions_file), problems, counts)
    counts["captioned_images"] = len(captions)

    split_of: dict[str, str] = {}
    split_order: dict[str, list[str]] = {}
    for split in SPLITS:
        path = layout.split_files.get(split)
        if path is None:
            problems.append(Problem("missing_file", "error", shown(layout.dataset_dir / SPLIT_FILES[split]),
                                    detail=f"split file {SPLIT_FILES[split]} not found"))
            split_order[split] = []
            continue
        split_order[split] = _parse_split_file(path, shown(path), split, split_of, problems)
        counts[split] = len(split_order[split])

    audio: dict[str, dict[int, Path]] = defaultdict(dict)
    speakers: dict[str, str] = {}
    if layout.facc_dir is not None:
        audio, speakers = _parse_facc(layout.facc_dir, shown, problems, counts)

    manifest_counts = load_manifest(name).counts
    captions_per_image = manifest_counts.get("captions_per_image", 5)
    samples = []
    for split in SPLITS:
        for stem in split_order[split]:
            samples.append(_sample(stem, split, layout, captions.get(stem, {}), audio.get(stem, {}), speakers,
                                   captions_per_image, shown, problems))
    counts["split_captions"] = sum(len(sample.captions) for sample in samples)
    if layout.facc_dir is not None:
        counts["split_utterances"] = sum(1 for s in samples for c in s.captions if c.audio is not None)

    for stem in sorted(image_stems - split_of.keys()):
        problems.append(Problem("image_outside_splits", "info", shown(layout.image_dir / f"{stem}.jpg"),
                                detail="in the image folder but in no split file"))
    _compare_counts(counts, manifest_counts, name, problems)
    audio_source = None
    if layout.facc_dir is not None:
        audio_source = "facc" if layout.facc_dir.parent.name == "facc" else name
        if audio_source == "facc":
            _compare_counts(counts, load_manifest("facc").counts, "facc", problems)
    return Scan(name, root, layout.dataset_dir, samples, problems, counts, audio_source=audio_source,
                audio_dir=layout.facc_dir, wav_format=PCM_16K_MONO)


def _lines(path: Path, shown: str, problems: list[Problem]):
    """(line number, text) for each non-blank line; undecodable lines become problems."""
    with open(path, "rb") as reader:
        for number, raw in enumerate(reader, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                problems.append(Problem("malformed_line", "error", shown, number, "not valid UTF-8"))
                continue
            if line.strip():
                yield number, line


def _parse_token_file(path: Path, shown: str, problems: list[Problem], counts: dict) -> dict[str, dict[int, str]]:
    captions: dict[str, dict[int, str]] = defaultdict(dict)
    lines = 0
    for number, line in _lines(path, shown, problems):
        lines += 1
        if "\t" not in line:
            problems.append(Problem("malformed_line", "error", shown, number,
                                    f"no TAB between key and caption: {line[:60]!r}"))
            continue
        key, text = line.split("\t", 1)
        match = _TOKEN_KEY.fullmatch(key.strip())
        text = text.strip()
        if match is None:
            problems.append(Problem("malformed_line", "error", shown, number, f"key {key!r} is not <image>.jpg#<n>"))
            continue
        if not text:
            problems.append(Problem("malformed_line", "error", shown, number, f"empty caption for {key}"))
            continue
        stem, caption_id = match["stem"], int(match["n"])
        if match["quirk"]:
            problems.append(Problem("quirk_key", "info", shown, number,
                                    f"{key!r} read as caption {caption_id} of image {stem}"))
        if caption_id in captions[stem]:
            problems.append(Problem("duplicate_caption", "error", shown, number, f"second caption #{caption_id} for {stem}"))
            continue
        captions[stem][caption_id] = text
    counts["caption_lines"] = lines
    return captions


def _parse_kaggle_captions(path: Path, shown: str, problems: list[Problem], counts: dict) -> dict[str, dict[int, str]]:
    """`image,caption` CSV of the Kaggle re-pack; caption numbers follow line order per image."""
    captions: dict[str, dict[int, str]] = defaultdict(dict)
    lines = 0
    for number, line in _lines(path, shown, problems):
        if number == 1 and line.replace(" ", "").lower() == "image,caption":
            continue
        lines += 1
        name, comma, text = line.partition(",")
        text = text.strip()
        if len(text) >= 2 and text[0] == text[-1] == '"':
            text = text[1:-1].replace('""', '"')
        match = _SPLIT_LINE.fullmatch(name.strip())
        if not comma or match is None or not text:
            problems.append(Problem("malformed_line", "error", shown, number, f"not <image>.jpg,<caption>: {line[:60]!r}"))
            continue
        stem = match["stem"]
        captions[stem][len(captions[stem])] = text
    counts["caption_lines"] = lines
    return captions


def _parse_split_file(path: Path, shown: str, split: str, split_of: dict[str, str], problems: list[Problem]) -> list[str]:
    order = []
    for number, line in _lines(path, shown, problems):
        match = _SPLIT_LINE.fullmatch(line.strip())
        if match is None:
            problems.append(Problem("malformed_line", "error", shown, number, f"not an image file name: {line[:60]!r}"))
            continue
        stem = match["stem"]
        if stem in split_of:
            severity = "warning" if split_of[stem] == split else "error"
            problems.append(Problem("split_overlap", severity, shown, number, f"{stem} is already in {split_of[stem]}"))
            continue
        split_of[stem] = split
        order.append(stem)
    return order


def _parse_facc(facc_dir: Path, shown, problems: list[Problem], counts: dict):
    audio: dict[str, dict[int, str]] = defaultdict(dict)
    wav_dir = facc_dir / "wavs"
    capt = facc_dir / "wav2capt.txt"
    listed = 0
    for number, line in _lines(capt, shown(capt), problems):
        fields = line.split()
        wav = _WAV_NAME.fullmatch(fields[0]) if fields else None
        if (len(fields) != 3 or wav is None or fields[1] != f"{wav['stem']}.jpg"
                or fields[2] != f"#{wav['n']}"):
            problems.append(Problem("malformed_line", "error", shown(capt), number,
                                    f"not '<stem>_<n>.wav <stem>.jpg #<n>': {line[:70]!r}"))
            continue
        listed += 1
        audio[wav["stem"]][int(wav["n"])] = str(wav_dir / fields[0])
    counts["wavs_listed"] = listed
    counts["wav_files"] = sum(1 for e in os.scandir(wav_dir) if e.name.endswith(".wav")) if wav_dir.is_dir() else 0

    speakers: dict[str, str] = {}
    spk = facc_dir / "wav2spk.txt"
    if not spk.is_file():
        problems.append(Problem("missing_file", "error", shown(spk), detail="wav2spk.txt not found"))
    else:
        for number, line in _lines(spk, shown(spk), problems):
            fields = line.split()
            if len(fields) != 2 or not fields[0].endswith(".wav") or not fields[1].isdigit():
                problems.append(Problem("malformed_line", "error", shown(spk), number,
                                        f"not '<wav> <speaker number>': {line[:70]!r}"))
                continue
            speakers[fields[0]] = fields[1]
    counts["speakers"] = len(set(speakers.values()))
    return audio, speakers


def _sample(stem, split, layout, image_captions, image_audio, speakers, captions_per_image, shown, problems) -> Sample:
    expected_ids = set(range(captions_per_image)) | set(image_captions)
    token_file = shown(layout.captions_file) if layout.captions_file else TOKEN_FILE
    for missing in sorted(expected_ids - set(image_captions)):
        problems.append(Problem("missing_caption", "error", token_file, detail=f"{stem} (split {split}) has no caption #{missing}"))
    caption_records = []
    for caption_id in sorted(image_captions):
        wav = image_audio.get(caption_id)
        if layout.facc_dir is not None and wav is None:
            problems.append(Problem("missing_wav", "error", shown(layout.facc_dir / "wav2capt.txt"),
                                    detail=f"no recording listed for {stem}.jpg #{caption_id}",
                                    drops="utterance", key=stem))
        caption_records.append(Caption(caption_id, image_captions[caption_id], wav,
                                       speakers.get(os.path.basename(wav)) if wav is not None else None))
    image = layout.image_dir / f"{stem}.jpg" if layout.image_dir else None
    return Sample(stem, split, image, tuple(caption_records),
                  meta={"image_file": shown(image) if image else None})


def _compare_counts(counts: dict, expected: dict, name: str, problems: list[Problem]) -> None:
    pairs = {"images": "images", "caption_lines": "caption_lines", "train": "train", "val": "val", "test": "test",
             "wav_files": "wavs", "speakers": "speakers"}
    for found_key, expected_key in pairs.items():
        if found_key in counts and expected_key in expected and counts[found_key] != expected[expected_key]:
            problems.append(Problem("count_differs", "warning", name,
                                    detail=f"{found_key}: found {counts[found_key]}, the {name} manifest says {expected[expected_key]}"))
