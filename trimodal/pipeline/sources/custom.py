"""Your own image / caption / speech data -> Samples, from either of two layouts.

1. The folder many research repositories ship: `DIR/metadata/<split>_metadata.json`, each a JSON list of
   `{"id", "caption", "image_filename", "audio_filename"?, "speaker"?}` rows, with the files under
   `DIR/images/<split>/` and `DIR/audio/<split>/`. Rows that share an image become one sample.
2. A JSONL manifest (`--manifest FILE.jsonl`), one sample per line:
   `{"key"?, "image", "captions": [...], "audio": [path or null, ...]?, "split"}`, paths relative to it.

Keys are image stems (dots made underscores) unless a line names its own; a key used twice is an error,
and so is one the feature store cannot hold (not ASCII, or longer than 64 bytes).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

from trimodal.errors import ConfigError, DatasetLayoutError
from trimodal.pipeline.base.jsonstream import MalformedJson, json_items
from trimodal.pipeline.base.samples import SPLITS, Caption, Problem, Sample, key_problem, one_line, sample_key
from trimodal.pipeline.base.scan import Scan
from trimodal.pipeline.sources import register_source

SPLIT_ALIASES = {"dev": "val", "valid": "val", "validation": "val"}


@register_source("custom", options=("manifest",))
def scan(root: Path | None, name: str = "custom", manifest: Path | None = None) -> Scan:
    """Read the metadata folder `root` (or `root/custom`), or the JSONL `manifest`."""
    if manifest is not None:
        manifest = Path(manifest)
        if not manifest.is_file():
            raise DatasetLayoutError(f"--manifest {manifest} does not exist")
        return _scan_jsonl(manifest, Path(root) if root is not None else manifest.parent, name)
    if root is None:
        raise ConfigError("custom needs --root DIR (a folder with metadata/<split>_metadata.json) or --manifest FILE.jsonl")
    root = Path(root)
    dataset_dir = next((d for d in (root, root / name) if (d / "metadata").is_dir()), None)
    if dataset_dir is None:
        raise DatasetLayoutError(f"{root} has no metadata/ folder (expected metadata/<split>_metadata.json, "
                                 "images/<split>/ and audio/<split>/), and no --manifest was given")
    return _scan_metadata(dataset_dir, root, name)


def _scan_metadata(dataset_dir: Path, root: Path, name: str) -> Scan:
    shown = lambda path: os.path.relpath(path, root)  # noqa: E731 - paths in problems are relative to root
    problems: list[Problem] = []
    # Dotfiles are macOS resource forks (`._train_metadata.json`), not splits.
    files = {path.name[: -len("_metadata.json")]: path for path in sorted((dataset_dir / "metadata").glob("*_metadata.json"))
             if not path.name.startswith(".")}
    samples: list[Sample] = []
    counts = {"rows": 0}
    keys: dict[str, str] = {}
    for split_name, path in files.items():
        split = SPLIT_ALIASES.get(split_name, split_name)
        grouped: dict[str, list[tuple[int, dict]]] = defaultdict(list)
        rows_read = 0
        try:
            # `number` is the list index (a row's id when it has none); messages count rows from 1.
            for number, row in enumerate(json_items(path, "item")):
                counts["rows"] += 1
                rows_read += 1
                image = row.get("image_filename") if isinstance(row, dict) else None
                if not isinstance(image, str) or not image:
                    problems.append(Problem("bad_row", "error", shown(path), detail=(
                        f"row {number + 1} has no 'image_filename': {str(row)[:80]}"), drops="sample"))
                    continue
                grouped[image].append((number, row))
        except MalformedJson as error:
            problems.append(Problem("malformed_json", "error", shown(path), error.line, f"does not parse: {error}"))
            continue
        if not rows_read and not _is_json_list(path):
            # ijson finds no list items in `{"data": [...]}`: without this the split would silently be empty.
            problems.append(Problem("malformed_json", "error", shown(path), detail=(
                "is not a JSON list of {id, caption, image_filename, audio_filename?} rows")))
            continue
        if split not in SPLITS:
            # The file's images all stay out of the shards: one problem each, so that --max-bad counts them.
            problems += [Problem("unknown_split", "error", shown(path), detail=(
                f"{image}: split {split_name!r} (from {path.name}) is none of {', '.join(SPLITS)} "
                "(or dev/valid/validation)"), drops="sample", key=sample_key(Path(image).stem)) for image in grouped]
            continue
        for image, rows in grouped.items():
            image_path = dataset_dir / "images" / split_name / image
            key = _claim_key(sample_key(Path(image).stem), split, image_path, keys, shown, problems, shown(path))
            if key is None:
                continue
            captions, ids = [], []
            for number, row in rows:
                text = row.get("caption")
                if not isinstance(text, str) or not one_line(text):
                    problems.append(Problem("no_caption", "error", shown(path), detail=(
                        f"row {number + 1} (id {row.get('id', number)}, {image}) has no caption")))
                    continue
                audio = row.get("audio_filename")
                speaker = row.get("speaker")
                captions.append(Caption(len(captions), one_line(text),
                                        str(dataset_dir / "audio" / split_name / audio) if isinstance(audio, str) and audio else None,
                                        str(speaker) if speaker is not None else None, text if one_line(text) != text else None))
                ids.append(row.get("id", number))
            sample = _sample(key, split, image_path, captions, {"row_ids": ids}, shown, problems, shown(path))
            if sample is not None:
                samples.append(sample)
    if not files:
        problems.append(Problem("missing_file", "error", shown(dataset_dir / "metadata"),
                                detail="no <split>_metadata.json in metadata/"))
    return _finish(name, root, dataset_dir, samples, problems, counts)


def _scan_jsonl(manifest: Path, root: Path, name: str) -> Scan:
    shown = lambda path: os.path.relpath(path, root)  # noqa: E731
    file = shown(manifest)
    base = manifest.parent
    problems: list[Problem] = []
    samples: list[Sample] = []
    keys: dict[str, str] = {}
    counts = {"rows": 0}
    with open(manifest, "rb") as reader:
        for number, raw in enumerate(reader, start=1):
            if not raw.strip():
                continue
            counts["rows"] += 1
            try:
                row = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as error:
                problems.append(Problem("malformed_line", "error", file, number, f"not a JSON object: {error}"))
                continue
            why = _row_problem(row)
            if why:
                problems.append(Problem("bad_row", "error", file, number, why, drops="sample"))
                continue
            split = SPLIT_ALIASES.get(row["split"], row["split"])
            image_path = base / row["image"]
            key = sample_key(row["key"] if row.get("key") else Path(row["image"]).stem)
            if split not in SPLITS:
                problems.append(Problem("unknown_split", "error", file, number, (
                    f"split {row['split']!r} is none of {', '.join(SPLITS)} (or dev/valid/validation)"),
                    drops="sample", key=key))
                continue
            key = _claim_key(key, split, image_path, keys, shown, problems, file, number)
            if key is None:
                continue
            audio = row.get("audio") or [None] * len(row["captions"])
            captions = []
            for n, (text, wav) in enumerate(zip(row["captions"], audio)):
                if not one_line(text):
                    problems.append(Problem("no_caption", "error", file, number, f"caption {n} of {shown(image_path)} is empty"))
                    continue
                captions.append(Caption(n, one_line(text), str(base / wav) if wav else None, None,
                                        text if one_line(text) != text else None))
            sample = _sample(key, split, image_path, captions, {}, shown, problems, file, number)
            if sample is not None:
                samples.append(sample)
    return _finish(name, root, base, samples, problems, counts)


def _row_problem(row) -> str | None:
    if not isinstance(row, dict):
        return "not a JSON object"
    if not isinstance(row.get("image"), str) or not row["image"]:
        return "no 'image' path"
    if not isinstance(row.get("split"), str):
        return "no 'split'"
    captions = row.get("captions")
    if not isinstance(captions, list) or not all(isinstance(text, str) for text in captions):
        return "'captions' must be a list of strings"
    audio = row.get("audio")
    if audio is not None and (not isinstance(audio, list) or len(audio) != len(captions)
                              or not all(wav is None or isinstance(wav, str) for wav in audio)):
        return f"'audio' must list one path or null per caption ({len(captions)})"
    if row.get("key") is not None and not isinstance(row["key"], str):
        return "'key' must be a string"
    return None


def _is_json_list(path: Path) -> bool:
    with open(path, "rb") as reader:
        return reader.read(4096).lstrip().startswith(b"[")


def _claim_key(key: str, split: str, image: Path, keys: dict[str, str], shown, problems, file: str,
               line: int | None = None) -> str | None:
    """`key`, recorded as taken; None (and a counted problem) when the feature store could not hold it."""
    why = key_problem(key)
    if why:
        problems.append(Problem("bad_key", "error", file, line, (
            f"key {key!r} of {shown(image)} {why}: rename the image (or, in a JSONL manifest, give a 'key')"),
            drops="sample", key=key, split=split))
        return None
    if key in keys:
        problems.append(Problem("duplicate_key", "error", file, line, (
            f"key {key!r} of {shown(image)} is also the key of {keys[key]}: give samples distinct image names "
            "(or, in a JSONL manifest, a 'key')")))
    keys.setdefault(key, shown(image))
    return key


def _sample(key, split, image, captions, meta, shown, problems, file, line=None) -> Sample | None:
    if not captions:
        problems.append(Problem("no_captions", "error", file, line, f"{shown(image)} has no caption",
                                drops="sample", key=key, split=split))
        return None
    return Sample(key, split, image, tuple(captions), {"image_file": shown(image), **meta})


def _finish(name, root, dataset_dir, samples, problems, counts) -> Scan:
    for split in SPLITS:
        counts[split] = sum(1 for sample in samples if sample.split == split)
    counts["split_captions"] = sum(len(sample.captions) for sample in samples)
    spoken = sum(1 for sample in samples for caption in sample.captions if caption.audio is not None)
    counts["split_utterances"] = spoken
    return Scan(name, root, dataset_dir, samples, problems, counts,
                audio_source=name if spoken else None, audio_dir=dataset_dir if spoken else None)
