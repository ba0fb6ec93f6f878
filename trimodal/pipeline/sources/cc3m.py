"""Conceptual Captions 3M: the two GCC TSVs (`caption<TAB>url`, no header) and the images they point to,
fetched by img2dataset into `cc3m/train/` and `cc3m/val/` as webdataset tars (adopted as shards as they are).

`mm download cc3m` fetches the TSVs (plain files; their sha256 is recorded on the first download), then
runs `download_cc3m`, the source's download hook: each TSV becomes a URL list that img2dataset downloads
resized as in its cc3m recipe, and `--retry-failed` tries the URLs that failed again. `mm validate cc3m`
reports success rates and failure reasons from img2dataset's parquet files.

ROOT may be in object storage (`--root s3://bucket/data`): img2dataset writes the shards there itself, the
TSVs, URL lists and records are kept there as on disk, and img2dataset's log is written on this machine
(`$TRIMODAL_CACHE/img2dataset-logs/…`) and copied into ROOT after each run.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

from trimodal.errors import ConfigError, DatasetLayoutError
from trimodal.pipeline.download.manifest import load_manifest
from trimodal.pipeline.base.samples import Problem
from trimodal.pipeline.base.scan import Scan, compare_counts
from trimodal.pipeline.sources import register_source
from trimodal.pipeline.download.urls import (
    SAMPLES_PER_SHARD,
    Img2datasetOptions,
    UrlList,
    check_output_folder,
    download_url_lists,
    url_list_path,
)
from trimodal.pipeline.download.url_report import read_split_record, report_scan
from trimodal.progress import SILENT, Reporter
from trimodal.storage import (StoragePath, copy_to_local, is_remote, location, make_folder, open_atomic,
                              storage_errors, upload, working_folder)

TSV_FILES = {"train": "Train_GCC-training.tsv", "val": "Validation_GCC-1.1.0-Validation.tsv"}
COLUMNS = ("caption", "url")
LOG = "img2dataset.log"
IMAGE_SIZE = 256  # the img2dataset cc3m recipe's
THREADS = 64  # the recipe's --thread_count
TIMEOUT_SECONDS = 10.0  # img2dataset's default per URL
ATTEMPTS = 3  # tries per URL in all, the first run's included, unless --retries says otherwise
_BAD_LINE_EXAMPLES = 5


def shard_cc3m(root, name, out, options, *, reporter, **source_options):
    from trimodal.pipeline.shard.adopt import adopt_splits  # written by another engineer
    root = location(root)
    return adopt_splits(name, {"train": root / name / "train", "val": root / name / "val"}, out, options, reporter=reporter)


def download_cc3m(target_dir: StoragePath, *, reporter: Reporter = SILENT, processes: int | None = None,
                  threads: int | None = None, image_size: int | None = None, max_samples: int | None = None,
                  retry_failed: bool = False, retries: int | None = None, distributor: str | None = None,
                  timeout: float | None = None, samples_per_shard: int | None = None) -> dict:
    """Download the images of both TSVs in `target_dir` (the first `max_samples` rows of each) into
    `target_dir/train/` and `target_dir/val/`, continuing an earlier run; with `retry_failed`, then try
    the URLs that failed again, up to `retries` tries per URL in all. Returns the download record's details.

    `timeout` (seconds per URL) and `samples_per_shard` are not command-line options: tests make them small.
    """
    if retries is not None and not retry_failed:
        raise ConfigError("--retries only applies with --retry-failed")
    if max_samples is not None and max_samples < 1:
        raise ConfigError(f"--max-samples must be at least 1 (got {max_samples})")
    target_dir = location(target_dir)
    # A split continues with the settings it was started with unless told otherwise (then it says why not).
    recorded = next((record for record in (read_split_record(target_dir / split) for split in TSV_FILES) if record), {})
    options = Img2datasetOptions(
        processes=processes if processes is not None else min(16, os.cpu_count() or 1),
        threads=threads if threads is not None else THREADS,
        image_size=image_size if image_size is not None else recorded.get("image_size", IMAGE_SIZE),
        timeout=timeout if timeout is not None else TIMEOUT_SECONDS,
        samples_per_shard=(samples_per_shard if samples_per_shard is not None
                           else recorded.get("samples_per_shard", SAMPLES_PER_SHARD)),
        distributor=distributor or "multiprocessing")
    options.check()
    url_lists = {}
    for split, file in TSV_FILES.items():
        output = target_dir / split
        check_output_folder(output)
        rows = write_url_list(target_dir / file, url_list_path(output), max_samples, reporter=reporter)
        url_lists[split] = UrlList(url_list_path(output), rows, output)
    with _log(target_dir) as log:
        details = download_url_lists(url_lists, options, log=log, retry_failed=retry_failed,
                                     max_attempts=retries if retries is not None else ATTEMPTS,
                                     command=f"mm download cc3m --root {target_dir.parent}", reporter=reporter)
    details.update(max_samples=max_samples, log=str(target_dir / LOG))
    return details


@contextmanager
def _log(target_dir: StoragePath):
    """img2dataset's log, a file on this machine (its output is redirected into it): `target_dir`'s own,
    or for a `target_dir` in object storage a local copy, copied back when the run ends however it ends."""
    if not is_remote(target_dir):
        yield target_dir / LOG
        return
    local = working_folder("img2dataset-logs", target_dir) / LOG
    local.parent.mkdir(parents=True, exist_ok=True)
    local.unlink(missing_ok=True)
    with storage_errors(f"reading {target_dir / LOG}"):
        if (target_dir / LOG).is_file():
            copy_to_local(target_dir / LOG, local)
    try:
        yield local
    finally:
        if local.is_file():
            with storage_errors(f"writing {target_dir / LOG}"):
                upload(local, target_dir / LOG)


def read_tsv(tsv: StoragePath):
    """The TSV as a table of (caption, url) strings; a line without exactly two tab-separated fields, or
    bytes that are not UTF-8, is a DatasetLayoutError that names the file and line."""
    import pyarrow as pa
    import pyarrow.csv as csv

    bad = []

    def invalid(row) -> str:
        bad.append(row)
        return "skip"

    try:
        # No quoting: captions hold `"` as a plain character (pyarrow would start a quoted field at it).
        with tsv.open("rb") as raw:
            table = csv.read_csv(
                raw, read_options=csv.ReadOptions(column_names=list(COLUMNS)),
                parse_options=csv.ParseOptions(delimiter="\t", quote_char=False, escape_char=False,
                                               invalid_row_handler=invalid),
                convert_options=csv.ConvertOptions(column_types={column: pa.string() for column in COLUMNS},
                                                   strings_can_be_null=False, quoted_strings_can_be_null=False))
    except (pa.ArrowInvalid, OSError) as error:
        raise DatasetLayoutError(f"{tsv}: cannot read it as caption<TAB>url lines ({error})") from error
    if bad:
        raise DatasetLayoutError(_bad_lines(tsv))
    if table.num_rows == 0:
        raise DatasetLayoutError(f"{tsv} holds no caption<TAB>url line")
    return table


def _bad_lines(tsv: StoragePath) -> str:
    """Which lines lack two fields (found again line by line: pyarrow's reader does not always know the number)."""
    found, total = [], 0
    with tsv.open("rb") as lines:
        for number, line in enumerate(lines, start=1):
            line = line.rstrip(b"\r\n")
            fields = line.count(b"\t") + 1
            if line and fields != len(COLUMNS):
                total += 1
                if len(found) < _BAD_LINE_EXAMPLES:
                    found.append(f"line {number} has {fields} field(s)")
    return (f"{tsv}: {total:,} line(s) are not caption<TAB>url ({'; '.join(found)}); the published file has "
            "exactly two tab-separated fields on every line")


def write_url_list(tsv: StoragePath, parquet: StoragePath, max_samples: int | None, *, reporter: Reporter = SILENT) -> int:
    """The first `max_samples` lines of `tsv` (all when None) as img2dataset's input; returns its rows.

    A parquet with named columns, not the TSV itself: img2dataset's tsv reader takes line 1 as the
    header (its cc3m recipe prepends one with sed) and reads `"` as a CSV quote. The published TSV stays
    as it is, so its recorded sha256 still holds. The parquet is rewritten only when the TSV or
    `max_samples` changed.
    """
    import pyarrow.parquet as pq

    if not tsv.is_file():
        raise DatasetLayoutError(f"{tsv} is missing: run `mm download cc3m --root {tsv.parent.parent}` to fetch it")
    stamp = _stamp(tsv, max_samples)
    known = _url_list_metadata(parquet)
    if known and all(known.get(key) == value for key, value in stamp.items()):
        return int(known["rows"])
    with reporter.task(f"read {tsv.name}", total=None, unit="rows") as task:
        table = read_tsv(tsv)
        task.update(total=table.num_rows, completed=table.num_rows)
    tsv_rows = table.num_rows
    if max_samples is not None:
        table = table.slice(0, max_samples)
    table = table.replace_schema_metadata({**stamp, "tsv_rows": str(tsv_rows), "rows": str(table.num_rows)})
    make_folder(parquet.parent)
    with open_atomic(parquet) as handle:
        pq.write_table(table, handle)
    return table.num_rows


def _stamp(tsv: StoragePath, max_samples: int | None) -> dict[str, str]:
    info = tsv.stat()
    return {"tsv": tsv.name, "tsv_bytes": str(info.st_size), "tsv_mtime_ns": str(info.st_mtime_ns),
            "max_samples": "" if max_samples is None else str(max_samples)}


def _url_list_metadata(parquet: StoragePath) -> dict[str, str]:
    import pyarrow.parquet as pq

    try:
        with parquet.open("rb") as raw:
            metadata = pq.read_schema(raw).metadata or {}
    except (OSError, ValueError):
        return {}
    return {key.decode(): value.decode() for key, value in metadata.items()}


def tsv_rows(tsv: StoragePath) -> int:
    """Lines of a TSV: from its URL list's record when that is current, else counted."""
    known = _url_list_metadata(url_list_path(tsv.parent / _split_of(tsv)))
    info = tsv.stat()
    if known.get("tsv_bytes") == str(info.st_size) and known.get("tsv_mtime_ns") == str(info.st_mtime_ns):
        return int(known["tsv_rows"])
    lines, last = 0, b"\n"
    with tsv.open("rb") as reader:
        while chunk := reader.read(1 << 22):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")


def _split_of(tsv: StoragePath) -> str:
    return next(split for split, file in TSV_FILES.items() if file == tsv.name)


@register_source("cc3m", shard=shard_cc3m, download=download_cc3m,
                 download_options=("processes", "threads", "image_size", "max_samples", "retry_failed", "retries",
                                   "distributor"), remote_root=True)
def scan(root: StoragePath, name: str = "cc3m") -> Scan:
    """The TSVs' line counts and what img2dataset made of them, per split (no samples are listed: the
    shards are img2dataset's own tars)."""
    root = location(root)
    dataset_dir = root / name
    command = f"mm download {name} --root {root}"
    if not dataset_dir.is_dir():
        raise DatasetLayoutError(f"{dataset_dir} does not exist; run `{command}` first")
    folders = {split: dataset_dir / split for split in TSV_FILES}
    result = report_scan(name, root, dataset_dir, folders)
    problems, counts = [], {}
    for split, file in TSV_FILES.items():
        tsv = dataset_dir / file
        if not tsv.is_file():
            problems.append(Problem("missing_tsv", "error", file, split=split,
                                    detail=f"the {split} URL list is not there: run `{command}`"))
            continue
        counts[f"{split}_pairs"] = tsv_rows(tsv)
        planned = _url_list_metadata(url_list_path(folders[split])).get("rows")
        tried = result.counts.get(f"{split}_urls", 0)
        if planned is not None and tried and tried < int(planned):
            problems.append(Problem("download_unfinished", "error", split, split=split,
                                    detail=f"{tried:,} of {int(planned):,} URLs have been tried: run `{command}` "
                                           "again to continue"))
    for problem in result.problems:
        if problem.kind == "not_downloaded":
            problem = Problem(problem.kind, "error", problem.file, split=problem.split,
                              detail=f"img2dataset has not finished a shard of {problem.split} yet: run `{command}`")
        problems.append(problem)
    counts.update(result.counts)
    compare_counts(counts, load_manifest(name).counts, name, problems)
    return Scan(name, root, dataset_dir, [], problems, counts)
