"""Flickr30k as unpacked on disk -> Samples, one per image of Karpathy's splits.

`ROOT/flickr30k/` holds what the request form's archives unpack to, `flickr30k-images/<id>.jpg` and
`results_20130124.token` (`<id>.jpg#<n><TAB><caption>`), and Karpathy's `dataset_flickr30k.json` from
`caption_datasets.zip`. The Kaggle re-pack many people have is read too: `flickr30k_images/` with the
images (directly or in a nested `flickr30k_images/`) and `results.csv` (`image_name| comment_number| comment`,
`|`-separated). Captions come from the token file (or the CSV), in caption-number order; the Karpathy file
gives each image its split (train 29,000, val 1,014, test 1,000; its order is the split's order) and is
never the source of a caption. Only annotation files are parsed here; whether images decode is checked by
the caller.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from trimodal.errors import DatasetLayoutError
from trimodal.pipeline.base.jsonstream import MalformedJson, json_items
from trimodal.pipeline.base.samples import SPLITS, Caption, Problem, Sample
from trimodal.pipeline.base.scan import Scan, compare_counts
from trimodal.pipeline.download.manifest import load_manifest
from trimodal.pipeline.sources import register_source
from trimodal.pipeline.sources.flickr8k import _lines, _parse_token_file

TOKEN_FILE = "results_20130124.token"
KARPATHY_FILE = "dataset_flickr30k.json"
KAGGLE_DIR = "flickr30k_images"
KAGGLE_CAPTIONS = "results.csv"
IMAGE_DIRS = ("flickr30k-images", f"{KAGGLE_DIR}/{KAGGLE_DIR}", KAGGLE_DIR)
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


@dataclass
class Layout:
    dataset_dir: Path
    image_dir: Path | None
    captions_file: Path | None
    karpathy_file: Path | None


def find_layout(root: Path, name: str) -> Layout:
    dataset_dir = root / name
    if not dataset_dir.is_dir():
        raise DatasetLayoutError(f"{dataset_dir} does not exist; run `mm download {name} --root {root}` first")
    image_dir = next((dataset_dir / d for d in IMAGE_DIRS
                      if (dataset_dir / d).is_dir() and any(e.name.endswith(".jpg") for e in os.scandir(dataset_dir / d))),
                     None)
    captions = next((p for p in (dataset_dir / TOKEN_FILE, dataset_dir / "flickr30k" / TOKEN_FILE,
                                 dataset_dir / KAGGLE_DIR / KAGGLE_CAPTIONS, dataset_dir / KAGGLE_CAPTIONS)
                     if p.is_file()), None)
    karpathy = next((p for p in (dataset_dir / KARPATHY_FILE, dataset_dir / "caption_datasets" / KARPATHY_FILE)
                     if p.is_file()), None)
    return Layout(dataset_dir, image_dir, captions, karpathy)


@register_source("flickr30k")
def scan(root: Path, name: str = "flickr30k") -> Scan:
    """Parse the annotation files under `root/name`."""
    root = Path(root)
    layout = find_layout(root, name)
    problems: list[Problem] = []
    counts: dict[str, int] = {}
    shown = lambda path: os.path.relpath(path, root)  # noqa: E731 - paths in problems are relative to root

    if layout.image_dir is None:
        problems.append(Problem("missing_file", "error", shown(layout.dataset_dir), detail=(
            f"no image folder (looked for {', '.join(d + '/' for d in IMAGE_DIRS)}; it comes with "
            "flickr30k-images.tar.gz: --only images)")))
        stems: set[str] = set()
    else:
        stems = {e.name[:-4] for e in os.scandir(layout.image_dir) if e.name.endswith(".jpg") and not e.name.startswith(".")}
    counts["images"] = len(stems)

    if layout.captions_file is None:
        problems.append(Problem("missing_file", "error", shown(layout.dataset_dir / TOKEN_FILE), detail=(
            f"no {TOKEN_FILE} (it comes with flickr30k.tar.gz: --only annotations) and no "
            f"{KAGGLE_DIR}/{KAGGLE_CAPTIONS}")))
        captions: dict[str, dict[int, str]] = {}
    elif layout.captions_file.name == KAGGLE_CAPTIONS:
        captions = _parse_kaggle(layout.captions_file, shown(layout.captions_file), problems, counts)
    else:
        captions = _parse_token_file(layout.captions_file, shown(layout.captions_file), problems, counts)
    counts["captioned_images"] = len(captions)

    order = _read_karpathy(layout, shown, problems)
    per_image = load_manifest(name).counts.get("captions_per_image", 5)
    samples = []
    for stem, split in order:
        image = layout.image_dir / f"{stem}.jpg" if layout.image_dir else None
        found = captions.get(stem, {})
        where = shown(layout.captions_file) if layout.captions_file else TOKEN_FILE
        if layout.captions_file is not None:
            for missing in sorted(set(range(per_image)) - set(found)):
                problems.append(Problem("missing_caption", "error", where,
                                        detail=f"{stem} (split {split}) has no caption #{missing}"))
        samples.append(Sample(stem, split, image, tuple(Caption(n, found[n]) for n in sorted(found)),
                              meta={"image_file": shown(image) if image else None}))
    for split in SPLITS:
        counts[split] = sum(1 for sample in samples if sample.split == split)
    counts["split_captions"] = sum(len(sample.captions) for sample in samples)
    listed = {stem for stem, _ in order}
    outside = len(stems - listed)
    if outside and order:
        problems.append(Problem("image_outside_splits", "info", shown(layout.image_dir),
                                detail=f"{outside} image(s) in no Karpathy split"))
    expected = {k: v for k, v in load_manifest(name).counts.items() if k in ("images", "caption_lines", *SPLITS)}
    compare_counts(counts, expected, name, problems)
    return Scan(name, root, layout.dataset_dir, samples, problems, counts)


def _parse_kaggle(path: Path, shown: str, problems: list[Problem], counts: dict) -> dict[str, dict[int, str]]:
    """The Kaggle re-pack's `results.csv`: `image_name| comment_number| comment`, one caption a line."""
    captions: dict[str, dict[int, str]] = defaultdict(dict)
    lines = 0
    for number, line in _lines(path, shown, problems):
        fields = [field.strip() for field in line.split("|")]
        if number == 1 and [f.lower() for f in fields[:2]] == ["image_name", "comment_number"]:
            continue
        lines += 1
        if len(fields) != 3 or not fields[0].endswith(".jpg") or not fields[1].isdigit() or not fields[2]:
            problems.append(Problem("malformed_line", "error", shown, number,
                                    f"not <id>.jpg| <n>| <caption>: {line[:60]!r}"))
            continue
        stem, caption_id = fields[0][:-4], int(fields[1])
        if caption_id in captions[stem]:
            problems.append(Problem("duplicate_caption", "error", shown, number, f"second caption #{caption_id} for {stem}"))
            continue
        captions[stem][caption_id] = fields[2]
    counts["caption_lines"] = lines
    return captions


def _read_karpathy(layout: Layout, shown, problems: list[Problem]) -> list[tuple[str, str]]:
    """(image stem, split) in the Karpathy file's order."""
    if layout.karpathy_file is None:
        problems.append(Problem("missing_file", "error", shown(layout.dataset_dir / KARPATHY_FILE), detail=(
            f"{KARPATHY_FILE} not found (it comes from caption_datasets.zip: --only annotations)")))
        return []
    file = shown(layout.karpathy_file)
    order, seen = [], set()
    try:
        for number, entry in enumerate(json_items(layout.karpathy_file, "images.item")):
            name = entry.get("filename") if isinstance(entry, dict) else None
            split = entry.get("split") if isinstance(entry, dict) else None
            if not isinstance(name, str) or not name.endswith(".jpg") or "/" in name or split not in KARPATHY_SPLITS:
                problems.append(Problem("malformed_json", "error", file, detail=(
                    f"images[{number}] has no .jpg filename or a split other than {', '.join(KARPATHY_SPLITS)}")))
                continue
            stem = name[:-4]
            if stem in seen:
                problems.append(Problem("split_overlap", "error", file, detail=f"{name} is listed twice"))
                continue
            seen.add(stem)
            order.append((stem, KARPATHY_SPLITS[split]))
    except MalformedJson as error:
        problems.append(Problem("malformed_json", "error", file, detail=str(error)))
    return order
