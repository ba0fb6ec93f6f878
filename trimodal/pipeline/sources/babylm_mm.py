"""BabyLM 2024 multimodal track: captions (JSON lists of strings) with precomputed DINOv2-base vectors.

No pixels are distributed: row i of a part's `.npy` files (concatenated in order) is the image of
caption i. Each caption becomes a text-only sample keyed `<part>-<row>` (`cc3m-00000042`); the vectors
stay in the `.npy` files, which `mm featurize` imports into `image/embedding` by key. Splits are drawn
per row from a seeded generator (default 1% val, 1% test), recorded in `OUT/splits.json`.

Nothing here holds all rows: captions are streamed (ijson) and the `.npy` files are only mapped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trimodal import __version__
from trimodal.atomic import write_json
from trimodal.errors import ConfigError, DatasetLayoutError, ShardError
from trimodal.pipeline.base.jsonstream import MalformedJson, json_items
from trimodal.pipeline.base.npyfiles import FeatureFileError, read_header, scan_nonfinite
from trimodal.pipeline.base.samples import Problem, one_line
from trimodal.pipeline.shard.writer import SIDECARS, ShardOptions
from trimodal.pipeline.read.index import FORMAT, INDEX
from trimodal.pipeline.base.scan import Scan
from trimodal.pipeline.sources import register_source
from trimodal.pipeline.shard.stream_writer import StreamedSample, StreamShardWriter
from trimodal.progress import SILENT, Reporter
from trimodal.storage import StoragePath, location, make_folder, prepare_folder

DINO_WIDTH = 768
EXTRACTOR = "dinov2-base (BabyLM)"
SPLITS_FILE = "splits.json"
_CHUNK = 65_536  # split draws per generator call


@dataclass(frozen=True)
class Part:
    name: str  # what `--part` names, and the key prefix
    captions: str
    features: tuple[str, ...]  # concatenated in this order, row-aligned with the captions


PARTS = (
    Part("cc3m", "cc_3M_captions.json", ("cc_3M_dino_v2_states_1of2.npy", "cc_3M_dino_v2_states_2of2.npy")),
    Part("localized-narratives", "local_narr_captions.json", ("local_narr_dino_v2_states.npy",)),
)


def row_key(part: str, row: int) -> str:
    return f"{part}-{row:08d}"


def parse_key(key: str) -> tuple[str, int]:
    """(part, row) of a BabyLM sample key."""
    part, _, row = key.rpartition("-")
    if part not in {p.name for p in PARTS} or not row.isdigit():
        raise ValueError(f"{key!r} is not a BabyLM sample key (<part>-<row>)")
    return part, int(row)


def present_parts(dataset_dir: Path) -> list[Part]:
    return [part for part in PARTS if (dataset_dir / part.captions).is_file()]


def _dataset_dir(root: Path, name: str) -> Path:
    dataset_dir = Path(root) / name
    if not dataset_dir.is_dir():
        raise DatasetLayoutError(f"{dataset_dir} does not exist (run `mm download {name} --root {root}`)")
    if not present_parts(dataset_dir):
        raise DatasetLayoutError(f"{dataset_dir} holds neither {PARTS[0].captions} nor {PARTS[1].captions} "
                                 f"(run `mm download {name} --root {root}`)")
    return dataset_dir


def captions(path: Path) -> Iterator[tuple[int, object]]:
    """(row, element) of a captions file, streamed; raises DatasetLayoutError when it does not parse."""
    try:
        yield from enumerate(json_items(path, "item"))
    except MalformedJson as error:
        raise DatasetLayoutError(f"{path}: {error} (it must be one JSON list of caption strings)") from None


def caption_problem(value: object) -> str | None:
    if not isinstance(value, str):
        return f"is a JSON {type(value).__name__}, not a string"
    if not value.strip():
        return "is empty"
    return None


# -- validate --------------------------------------------------------------------------------------


def scan(root: Path, name: str = "babylm-mm", val_fraction: float | None = None,
         test_fraction: float | None = None) -> Scan:
    """Check every part present: captions parse and are strings, feature files are float (N, 768)
    matrices whose rows add up to the captions and hold no NaN/inf. Samples are not listed (millions)."""
    dataset_dir = _dataset_dir(root, name)
    problems: list[Problem] = []
    counts: dict[str, int] = {}
    for part in present_parts(dataset_dir):
        rows = 0
        for row, value in captions(dataset_dir / part.captions):
            rows += 1
            why = caption_problem(value)
            if why:
                problems.append(Problem("bad_caption", "error", part.captions, detail=f"row {row} {why}",
                                        drops="sample", key=row_key(part.name, row)))
        counts[f"{part.name} captions"] = rows
        feature_rows = 0
        for file in part.features:
            try:
                header = read_header(dataset_dir / file, DINO_WIDTH)
            except FeatureFileError as error:
                problems.append(Problem("bad_features", "error", file, detail=str(error)))
                continue
            feature_rows += header.rows
            bad = scan_nonfinite(header.path)
            if bad:
                shown = ", ".join(map(str, bad[:10])) + (" …" if len(bad) > 10 else "")
                problems.append(Problem("nonfinite_features", "error", file,
                                        detail=f"{len(bad)} row(s) hold NaN or inf: {shown}"))
        counts[f"{part.name} feature rows"] = feature_rows
        if feature_rows != rows:
            problems.append(Problem("row_count_mismatch", "error", part.captions,
                                    detail=f"{rows:,} captions but {feature_rows:,} feature rows in "
                                           f"{' + '.join(part.features)}; row i must be caption i"))
    return Scan(name, Path(root), dataset_dir, [], problems, counts)


# -- shard -----------------------------------------------------------------------------------------


def shard_babylm(root: Path, name: str, out: Path, options: ShardOptions, *, reporter: Reporter = SILENT,
                 val_fraction: float | None = None, test_fraction: float | None = None) -> dict:
    """Text-only shards of every part present, in row order per split; `index.json` says where each
    sample's image vector is (`precomputed`)."""
    val_fraction = 0.01 if val_fraction is None else val_fraction
    test_fraction = 0.01 if test_fraction is None else test_fraction
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(f"--val-fraction {val_fraction} and --test-fraction {test_fraction} must be fractions "
                          "that leave some rows for training")
    dataset_dir = _dataset_dir(root, name)
    out = location(out)
    parts = present_parts(dataset_dir)
    files = {part.name: [read_header(dataset_dir / file, DINO_WIDTH) for file in _features(dataset_dir, part)]
             for part in parts}
    rows = {part.name: _count_captions(dataset_dir / part.captions) for part in parts}
    for part in parts:
        feature_rows = sum(header.rows for header in files[part.name])
        if feature_rows != rows[part.name]:
            raise ShardError(f"{dataset_dir / part.captions} has {rows[part.name]:,} captions but "
                             f"{' + '.join(part.features)} hold {feature_rows:,} rows; row i must be caption i")
    prepare_folder(out)
    (out / INDEX).unlink(missing_ok=True)
    make_folder(out / SIDECARS)
    digests = _digests(out, [header.path for part in parts for header in files[part.name]], reporter)
    rule = {"seed": options.seed, "val_fraction": val_fraction, "test_fraction": test_fraction,
            "generator": "numpy default_rng([seed, part number]).random() per row, in row order: "
                         "val below val_fraction, test below val_fraction + test_fraction"}
    inputs = [[str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns]
              for part in parts for path in [dataset_dir / part.captions] + [h.path for h in files[part.name]]]
    fingerprint = hashlib.sha256(json.dumps([FORMAT, name, inputs, rule, options.args()]).encode()).hexdigest()

    skipped: list[dict] = []
    held_out: dict[str, dict[str, list[int]]] = {}
    writer = StreamShardWriter(out, options, fingerprint)
    with reporter.task(f"shard {name}", total=sum(rows.values()), unit="samples") as task:
        result = writer.write_all(_samples(dataset_dir, parts, rule, skipped, held_out), task.advance)

    planned = sum(rows.values())
    if planned and len(skipped) / planned > options.max_bad:
        examples = "; ".join(f"{s['key']}: {s['reason']}" for s in skipped[:10])
        raise ShardError(f"too many bad captions: {len(skipped)} of {planned} ({len(skipped) / planned:.2%}), more "
                         f"than --max-bad {options.max_bad}; no {INDEX} written. Bad: {examples}")
    write_json(out / SPLITS_FILE, {"rule": rule, "parts": {
        part.name: {"rows": rows[part.name], **held_out.get(part.name, {"val": [], "test": []})} for part in parts}})
    index = {
        "format": FORMAT, "dataset": name, "created_with": f"trimodal {__version__}",
        "args": {**options.args(), "val_fraction": val_fraction, "test_fraction": test_fraction},
        "source": {"root": str(Path(root).resolve()), "dataset_dir": str(dataset_dir.resolve()), "audio": None,
                   "audio_dir": None},
        "modalities": ["text"],
        "splits": {split: result.splits[split] for split in ("train", "val", "test") if split in result.splits},
        "split_rule": {**rule, "rows_file": SPLITS_FILE},
        "totals": {"planned_samples": planned, "bad_samples": len(skipped), "planned_utterances": 0,
                   "bad_utterances": 0},
        "skipped": skipped,
        "annotation_problems": [],
        # Where each sample's image vector is: featurize imports these rows by key.
        "precomputed": {"image/embedding": {
            "extractor": EXTRACTOR, "width": DINO_WIDTH,
            "parts": {part.name: {"rows": rows[part.name], "files": [
                {"file": header.path.name, "path": str(header.path.resolve()), "rows": header.rows,
                 "dtype": str(header.dtype), "bytes": header.bytes, "mtime_ns": header.path.stat().st_mtime_ns,
                 "sha256": digests[str(header.path.resolve())]} for header in files[part.name]]}
                for part in parts}}},
    }
    write_json(out / INDEX, index)
    return index


def _features(dataset_dir: Path, part: Part) -> list[Path]:
    missing = [file for file in part.features if not (dataset_dir / file).is_file()]
    if missing:
        raise DatasetLayoutError(f"{dataset_dir} has {part.captions} but not {', '.join(missing)} (its image vectors); "
                                 f"run `mm download babylm-mm --part {part.name}`")
    return [dataset_dir / file for file in part.features]


def _count_captions(path: Path) -> int:
    count = 0
    for count, _ in enumerate(captions(path), start=1):
        pass
    return count


def _samples(dataset_dir: Path, parts: list[Part], rule: dict, skipped: list[dict],
             held_out: dict) -> Iterator[StreamedSample]:
    for number, part in enumerate(parts):
        generator = np.random.default_rng([rule["seed"], number])
        draws = np.empty(0)
        record = held_out.setdefault(part.name, {"val": [], "test": []})
        for row, value in captions(dataset_dir / part.captions):
            if row % _CHUNK == 0:
                draws = generator.random(_CHUNK)
            draw = draws[row % _CHUNK]
            split = "val" if draw < rule["val_fraction"] else \
                "test" if draw < rule["val_fraction"] + rule["test_fraction"] else "train"
            key = row_key(part.name, row)
            why = caption_problem(value)
            if why:
                skipped.append({"split": split, "key": key, "file": part.captions, "reason": f"caption {why}"})
                continue
            if split != "train":
                record[split].append(row)
            meta = {"key": key, "split": split,
                    "captions": [{"id": 0, "text": value, "speaker": None, "audio": None}],
                    "source": {"dataset": "babylm-mm", "image": None, "audio": None, "captions": part.captions},
                    "meta": {"part": part.name, "row": row}}
            yield StreamedSample(split, key, [(f"{key}.txt", (one_line(value) + "\n").encode("utf-8")),
                                              (f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))])


def _digests(out: StoragePath, paths: list[Path], reporter: Reporter) -> dict[str, str]:
    """sha256 of each features file, cached by (size, mtime) in OUT/.shards/digests.json (GBs each)."""
    from trimodal.pipeline.download.fetch import hash_file

    cache_path = out / SIDECARS / "digests.json"
    try:
        cache = json.loads(cache_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    digests = {}
    for path in paths:
        key = str(path.resolve())
        stat = [path.stat().st_size, path.stat().st_mtime_ns]
        if cache.get(key, {}).get("stat") != stat:
            with reporter.task(f"sha256 {path.name}", total=stat[0], unit="bytes") as task:
                cache[key] = {"stat": stat, "sha256": hash_file(path, ["sha256"], task)["sha256"]}
            write_json(cache_path, cache)
        digests[key] = cache[key]["sha256"]
    return digests


register_source("babylm-mm", options=("val_fraction", "test_fraction"), shard=shard_babylm)(scan)
