"""MS-COCO captions (2014, 2017) as unpacked on disk -> Samples, one per image of a split.

`ROOT/coco2014/` holds `train2014/`, `val2014/`, `annotations/captions_{train,val}2014.json` and
Karpathy's `dataset_coco.json`. Captions come from the annotation files, sorted by annotation id; the
Karpathy file only assigns each image its split (train and restval make `train`) and its sentences
are compared with the annotations. SpokenCOCO joins when `ROOT/spokencoco/SpokenCOCO/` (or
`SpokenCOCO/` inside the dataset folder, as in mini-coco) is there. The JSON files are streamed.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from trimodal.errors import ConfigError, DatasetLayoutError
from trimodal.pipeline.download.marker import read_state
from trimodal.pipeline.base.jsonstream import MalformedJson, json_items
from trimodal.pipeline.download.manifest import load_manifest
from trimodal.pipeline.base.samples import Caption, Problem, Sample, one_line, sample_key
from trimodal.pipeline.base.scan import Scan, compare_counts
from trimodal.pipeline.sources import register_source, spokencoco

KARPATHY_FILE = "dataset_coco.json"
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
SPLIT_CHOICES = ("karpathy", "official")


@dataclass(slots=True)
class CocoImage:
    key: str
    folder: str  # train2014, val2017, …
    file_name: str
    captions: list[tuple[int, str]] = field(default_factory=list)  # (annotation id, raw caption)


@register_source("coco2014", options=("splits",))
@register_source("coco2017", options=("splits",))
def scan(root: Path, name: str, splits: str | None = None) -> Scan:
    """Parse the annotation files under `root/name` (and SpokenCOCO's, when present)."""
    year = "2017" if name.endswith("2017") else "2014"
    splits = splits or ("karpathy" if year == "2014" else "official")
    if splits not in SPLIT_CHOICES:
        raise ConfigError(f"--splits must be one of {', '.join(SPLIT_CHOICES)} (got {splits!r})")
    if splits == "karpathy" and year == "2017":
        raise ConfigError("Karpathy's splits are defined on the 2014 file names: use coco2014 for them "
                          "(coco2017 has the official train2017/val2017 splits only)")
    root = Path(root)
    dataset_dir = root / name
    if not dataset_dir.is_dir():
        raise DatasetLayoutError(f"{dataset_dir} does not exist; run `mm download {name} --root {root}` first")
    shown = lambda path: os.path.relpath(path, root)  # noqa: E731 - paths in problems are relative to root
    problems: list[Problem] = []
    counts: dict[str, int] = {}

    images: dict[int, CocoImage] = {}
    keys: dict[str, int] = {}
    for part in ("train", "val"):
        _read_annotations(dataset_dir / "annotations" / f"captions_{part}{year}.json", f"{part}{year}", images,
                          keys, shown, problems, counts)
    del keys
    counts["images"] = len(images)
    counts["captions"] = sum(len(image.captions) for image in images.values())

    if splits == "karpathy":
        order = _read_karpathy(dataset_dir, images, shown, problems, counts)
    else:
        order = [(cocoid, "train" if image.folder.startswith("train") else "val", None)
                 for cocoid, image in images.items()]
        if year == "2017":
            problems.append(Problem("karpathy_overlap", "info", name, detail=(
                "train2017 contains the 5,000 Karpathy test (and 5,000 val) images of coco2014: do not report "
                "Karpathy-test numbers for a model trained on coco2017 train")))

    absent = _absent_folders(dataset_dir, name, images, order, shown, problems, counts)
    spoken_dir = spokencoco.find(root, dataset_dir, name)
    audio: dict[int, dict[int, tuple[str, str]]] = {}
    if spoken_dir is not None:
        audio = spokencoco.join(spoken_dir, images, absent, shown, problems, counts)

    samples = []
    for cocoid, split, karpathy_split in order:
        image = images[cocoid]
        if image.folder in absent:
            continue
        # Each record gives way to its sample, so the two are not all held at once.
        sample = _sample(cocoid, image, split, karpathy_split, dataset_dir, audio.pop(cocoid, {}), problems)
        image.captions = []
        if sample is not None:
            samples.append(sample)
    for split in ("train", "val", "test"):
        counts[split] = sum(1 for sample in samples if sample.split == split)
    counts["split_captions"] = sum(len(sample.captions) for sample in samples)
    if spoken_dir is not None:
        counts["split_utterances"] = sum(1 for s in samples for c in s.captions if c.audio is not None)
        counts["split_captions_without_audio"] = counts["split_captions"] - counts["split_utterances"]
    expected = load_manifest(name).counts
    if absent or (year == "2014" and splits == "official"):  # the manifest's split counts are Karpathy's
        expected = {key: value for key, value in expected.items() if key not in ("train", "val", "test")}
    compare_counts(counts, expected, name, problems)
    return Scan(name, root, dataset_dir, samples, problems, counts,
                audio_source=None if spoken_dir is None else ("spokencoco" if spoken_dir.parent.name == "spokencoco" else name),
                audio_dir=spoken_dir)


def _read_annotations(path: Path, folder: str, images: dict[int, CocoImage], keys: dict[str, int], shown, problems,
                      counts) -> None:
    file = shown(path)
    if not path.is_file():
        problems.append(Problem("missing_file", "error", file, detail=f"{path.name} not found (it comes with the "
                                                                      "annotations archive: --only annotations)"))
        return
    found = 0
    try:
        for number, entry in enumerate(json_items(path, "images.item")):
            cocoid, file_name = _field(entry, "id", int), _field(entry, "file_name", str)
            if cocoid is None or not file_name:
                problems.append(Problem("malformed_json", "error", file, detail=f"images[{number}] has no integer "
                                                                                f"'id' and 'file_name': {str(entry)[:80]}"))
                continue
            if cocoid in images:
                problems.append(Problem("duplicate_image_id", "error", file, detail=(
                    f"image id {cocoid} ({file_name}) is also {images[cocoid].folder}/{images[cocoid].file_name}")))
                continue
            key = sample_key(file_name.rsplit(".", 1)[0])
            if key in keys:
                problems.append(Problem("duplicate_key", "error", file, detail=(
                    f"image id {cocoid} has the file name {file_name} of image id {keys[key]}")))
                continue
            keys[key] = cocoid
            images[cocoid] = CocoImage(key, folder, file_name)
            found += 1
        counts[f"{folder}_images"] = found
        captions = 0
        for number, entry in enumerate(json_items(path, "annotations.item")):
            cocoid, annotation_id, text = _field(entry, "image_id", int), _field(entry, "id", int), _field(entry, "caption", str)
            if cocoid is None or annotation_id is None or text is None:
                # One bad record in 600k is listed, not fatal: it is a caption that cannot be placed.
                problems.append(Problem("bad_annotation", "error", file, detail=(
                    f"annotations[{number}] lacks an integer 'image_id', integer 'id' or string 'caption': "
                    f"{str(entry)[:80]}")))
                continue
            image = images.get(cocoid)
            if image is None or image.folder != folder:
                problems.append(Problem("unknown_image_id", "error", file, detail=(
                    f"annotation {annotation_id} is for image id {cocoid}, which {path.name} does not list")))
                continue
            if not one_line(text):
                problems.append(Problem("empty_caption", "error", file, detail=f"annotation {annotation_id} of "
                                                                               f"{image.key} is empty"))
                continue
            image.captions.append((annotation_id, text))
            captions += 1
        counts[f"{folder}_captions"] = captions
    except MalformedJson as error:
        problems.append(Problem("malformed_json", "error", file, error.line, f"does not parse: {error}"))
        return
    if not found:
        problems.append(Problem("malformed_json", "error", file, detail="no 'images' list with entries"))


def _read_karpathy(dataset_dir: Path, images: dict[int, CocoImage], shown, problems, counts) -> list:
    """(cocoid, split, Karpathy's split) in the Karpathy file's order, which the 1k test folds follow."""
    path = next((p for p in (dataset_dir / KARPATHY_FILE, dataset_dir / "caption_datasets" / KARPATHY_FILE)
                 if p.is_file()), None)
    if path is None:
        problems.append(Problem("missing_file", "error", shown(dataset_dir / KARPATHY_FILE), detail=(
            f"{KARPATHY_FILE} not found (it comes from caption_datasets.zip: --only annotations); "
            "or use --splits official")))
        return []
    file = shown(path)
    order, seen = [], set()
    normalised = lambda text: " ".join(text.lower().split()).rstrip(" .")  # noqa: E731
    try:
        for number, entry in enumerate(json_items(path, "images.item")):
            cocoid, split = _field(entry, "cocoid", int), entry.get("split") if isinstance(entry, dict) else None
            file_name = _field(entry, "filename", str) or ""
            if cocoid is None or split not in KARPATHY_SPLITS:
                problems.append(Problem("malformed_json", "error", file, detail=(
                    f"images[{number}] needs an integer 'cocoid' and a split in {', '.join(KARPATHY_SPLITS)}: "
                    f"{str(entry)[:80]}")))
                continue
            if cocoid in seen:
                problems.append(Problem("duplicate_key", "error", file, detail=f"cocoid {cocoid} is listed twice"))
                continue
            seen.add(cocoid)
            image = images.get(cocoid)
            if image is None:
                key = sample_key(file_name.rsplit(".", 1)[0]) or str(cocoid)
                problems.append(Problem("karpathy_unknown_image", "error", file, detail=(
                    f"{file_name or cocoid} (cocoid {cocoid}, split {split}) is in no annotation file"),
                    drops="sample", key=key, split=KARPATHY_SPLITS[split]))
                continue
            if (file_name, entry.get("filepath")) != (image.file_name, image.folder):
                problems.append(Problem("karpathy_differs", "warning", file, detail=(
                    f"cocoid {cocoid} is {entry.get('filepath')}/{file_name} here, "
                    f"{image.folder}/{image.file_name} in the annotations")))
            # Sorted lists, not Counters: the same test at a fraction of the cost over 600k sentences.
            listed = entry.get("sentences")
            sentences = sorted(normalised(s["raw"]) for s in (listed if isinstance(listed, list) else ())
                               if isinstance(s, dict) and isinstance(s.get("raw"), str))
            annotated = sorted(normalised(text) for _, text in image.captions)
            if sentences != annotated:
                differing = sum((Counter(sentences) - Counter(annotated)).values())
                problems.append(Problem("karpathy_caption_differs", "warning", file, key=image.key, detail=(
                    f"{image.key}: {differing} of its {len(sentences)} Karpathy sentences differ from the "
                    f"{len(image.captions)} annotation captions (the annotations are used)")))
            order.append((cocoid, KARPATHY_SPLITS[split], split))
    except MalformedJson as error:
        problems.append(Problem("malformed_json", "error", file, error.line, f"does not parse: {error}"))
        return []
    counts.update({f"karpathy_{name}": count for name, count in Counter(split for *_, split in order).items()})
    for cocoid in images.keys() - seen:
        problems.append(Problem("outside_splits", "info", file, detail=(
            f"{images[cocoid].folder}/{images[cocoid].file_name} is in no Karpathy split")))
    return order


def _absent_folders(dataset_dir: Path, name: str, images, order, shown, problems, counts) -> set[str]:
    """Image folders not downloaded (`--only`): their samples are left out with one warning each, not one
    missing-image error per file; an error when the download record says the folder was fetched."""
    needed = Counter(images[cocoid].folder for cocoid, *_ in order)
    downloaded = set(read_state(dataset_dir).get("parts", ()))
    absent = set()
    for folder, count in sorted(needed.items()):
        if (dataset_dir / folder).is_dir():
            continue
        absent.add(folder)
        part = folder.rstrip("0123456789")
        was_downloaded = part in downloaded
        problems.append(Problem("missing_file" if was_downloaded else "part_not_downloaded",
                                "error" if was_downloaded else "warning", shown(dataset_dir / folder), detail=(
            f"{folder}/ is not there: its {count:,} split images are left out" +
            ("" if was_downloaded else f" (`mm download {name} --only {part}` adds them)"))))
        counts[f"{folder}_left_out"] = count
    return absent


def _sample(cocoid: int, image: CocoImage, split: str, karpathy_split: str | None, dataset_dir: Path,
            spoken: dict[int, tuple[str, str | None]], problems) -> Sample | None:
    # Strings joined, then one Path: two `/` per image cost seconds at 123k images, as does relpath.
    path = Path(f"{dataset_dir}/{image.folder}/{image.file_name}")
    image_file = f"{dataset_dir.name}/{image.folder}/{image.file_name}"
    if not image.captions:
        problems.append(Problem("no_captions", "error", image_file, detail=f"{image.key} (split {split}) has no caption",
                                drops="sample", key=image.key, split=split))
        return None
    captions = []
    ordered = sorted(image.captions)
    for (first, _), (second, _) in zip(ordered, ordered[1:]):
        if first == second:
            problems.append(Problem("duplicate_caption", "error", image_file, detail=(
                f"annotation id {first} is given twice for {image.key}")))
    for annotation_id, raw in ordered:
        text = one_line(raw)
        wav, speaker = spoken.get(annotation_id, (None, None))
        # `raw` itself when nothing changed: one string per caption, not two (600k of them at scale).
        captions.append(Caption(annotation_id, raw if text == raw else text, wav, speaker, None if text == raw else raw))
    meta = {"image_file": image_file, "cocoid": cocoid}
    if karpathy_split is not None:
        meta["karpathy_split"] = karpathy_split
    return Sample(image.key, split, path, tuple(captions), meta)


def _field(entry, name: str, kind: type):
    value = entry.get(name) if isinstance(entry, dict) else None
    return value if isinstance(value, kind) and not isinstance(value, bool) else None
