"""What img2dataset's output folders say: finished shards, and per split the URLs downloaded and the
failures by reason, reconciled with retries by URL (read from its per-shard parquet files).

For shard K of an output folder img2dataset writes `K.tar`, `K.parquet` (one row per URL tried) and,
last, `K_stats.json`: a shard is finished when its stats file exists. What trimodal adds to a split
folder (its settings, which shards hold retries) lives in `_trimodal/split.json`.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

from trimodal.atomic import write_json
from trimodal.errors import DatasetLayoutError
from trimodal.pipeline.base.samples import Problem
from trimodal.pipeline.base.scan import Scan
from trimodal.storage import StoragePath, location, listing, make_folder

SHARD_DIGITS = 5  # img2dataset's oom_shard_count: shards 00000 … 99999
RECORD_DIR = "_trimodal"
RECORD = "split.json"  # settings the split was downloaded with, and which shards hold retries
STATS = re.compile(r"(\d+)_stats\.json")

@dataclass
class FailureReason:
    status: str  # failed_to_download | failed_to_resize
    message: str  # img2dataset's error_message, e.g. "HTTP Error 404: Not Found"
    count: int
    examples: list[str]  # a few of the URLs


@dataclass
class SplitReport:
    """One split as img2dataset's parquet files tell it, each URL counted once however often it was tried."""

    split: str
    folder: StoragePath
    rows: int = 0  # URLs in the finished shards of the first run
    downloaded: int = 0  # of those, the ones that gave an image, on the first try or a later one
    recovered: int = 0  # of `downloaded`, the ones that failed first and succeeded on a retry
    shards: int = 0  # finished shards of the first run
    retry_shards: int = 0  # finished shards of retries
    reasons: list[FailureReason] = field(default_factory=list)  # latest reason of each failed URL, most frequent first
    unfinished: list[int] = field(default_factory=list)  # shards with a tar but no stats: interrupted or being written

    @property
    def failed(self) -> int:
        return self.rows - self.downloaded

    @property
    def success_rate(self) -> float:
        return self.downloaded / self.rows if self.rows else 0.0

    def to_dict(self) -> dict:
        return {"rows": self.rows, "downloaded": self.downloaded, "failed": self.failed, "recovered": self.recovered,
                "success_rate": round(self.success_rate, 4), "shards": self.shards, "retry_shards": self.retry_shards,
                "reasons": [asdict(reason) for reason in self.reasons], "unfinished": self.unfinished}


# --- what a split folder holds ---------------------------------------------------------------------------


def completed_shards(folder: StoragePath, skip: set[int] = frozenset()) -> dict[int, dict]:
    """{shard number: its stats} for every shard of `folder` that img2dataset finished (but those in `skip`)."""
    shards = {}
    for path in listing(location(folder), "*_stats.json"):
        match = STATS.fullmatch(path.name)
        if match and int(match.group(1)) not in skip:
            try:
                shards[int(match.group(1))] = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # being written (img2dataset writes it in place): not finished yet
    return shards


def shard_name(number: int) -> str:
    return f"{number:0{SHARD_DIGITS}d}"


def read_split_record(folder: StoragePath) -> dict:
    try:
        return json.loads((location(folder) / RECORD_DIR / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def write_split_record(folder: StoragePath, record: dict) -> None:
    make_folder(folder / RECORD_DIR)
    write_json(folder / RECORD_DIR / RECORD, record)


def unfinished_shards(folder: StoragePath, done: dict[int, dict]) -> list[int]:
    """Shards with a tar or parquet file but no (readable) stats file."""
    numbers = {int(path.stem) for suffix in ("tar", "parquet") for path in listing(folder, f"*.{suffix}")
               if path.stem.isdigit()}
    return sorted(numbers - set(done))


# --- reading img2dataset's parquet files -----------------------------------------------------------------


def _read_rows(folder: StoragePath, shards: list[int], columns: tuple[str, ...] = ("url", "status", "error_message")):
    """The rows of the parquet files of `shards`, in shard order, with a `shard` column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for number in shards:
        path = folder / f"{shard_name(number)}.parquet"
        try:
            with path.open("rb") as raw:
                table = pq.read_table(raw, columns=list(columns))
        except (OSError, pa.ArrowException) as error:
            raise DatasetLayoutError(f"{path}: cannot read img2dataset's record of shard {shard_name(number)} "
                                     f"({error}); remove {shard_name(number)}_stats.json to have the shard "
                                     "downloaded again") from error
        tables.append(table.append_column("shard", pa.array([number] * table.num_rows, pa.int32())))
    if not tables:
        return pa.table({**{name: pa.array([], pa.string()) for name in columns}, "shard": pa.array([], pa.int32())})
    return pa.concat_tables(tables)


def _split_rows(folder: StoragePath, columns: tuple[str, ...] = ("url", "status", "error_message")):
    """(first-run rows, retry rows) of the finished shards of `folder`."""
    done = sorted(completed_shards(folder))
    retry = set(read_split_record(folder).get("retry_shards", []))
    return (_read_rows(folder, [n for n in done if n not in retry], columns),
            _read_rows(folder, [n for n in done if n in retry], columns))


def _recovered_urls(first, retried):
    """URLs that failed in a first-run row but succeeded elsewhere: on a retry, or in another row of the
    same URL. Hashes only the failed URLs (a third of CC3M), not the ~2M that succeeded at once."""
    import pyarrow as pa
    import pyarrow.compute as pc

    succeeded = pc.equal(first["status"], "success")
    failed_urls = pc.unique(first["url"].filter(pc.invert(succeeded)))
    again = first["url"].filter(pc.and_(succeeded, pc.is_in(first["url"], value_set=failed_urls)))
    on_retry = retried["url"].filter(pc.equal(retried["status"], "success"))
    return pc.unique(pa.chunked_array(again.chunks + on_retry.chunks, pa.string()))


def split_report(folder: StoragePath, split: str, *, examples: int = 3, max_reasons: int = 12) -> SplitReport:
    """Successes and failures of one img2dataset output folder, each first-run URL counted once.

    A URL that failed and then succeeded on a retry counts as downloaded (the first run's parquet still
    says failed: rows are reconciled by URL); one that never succeeded is counted under the reason of
    its latest attempt. Reasons beyond the `max_reasons` most frequent are summed as "other reasons".
    """
    folder = location(folder)
    first, retried = _split_rows(folder)
    return _report(folder, split, first, _unresolved(first, retried), examples, max_reasons)


def _report(folder: StoragePath, split: str, first, unresolved, examples: int = 3, max_reasons: int = 12) -> SplitReport:
    import pyarrow.compute as pc

    done = completed_shards(folder)
    report = SplitReport(split, folder, rows=first.num_rows, unfinished=unfinished_shards(folder, done))
    report.retry_shards = len(set(read_split_record(folder).get("retry_shards", [])) & set(done))
    report.shards = len(done) - report.retry_shards
    report.downloaded = first.num_rows - unresolved.num_rows
    report.recovered = pc.sum(pc.not_equal(first["status"], "success")).as_py() - unresolved.num_rows
    counts = unresolved.group_by(["latest_status", "latest_message"]).aggregate([("url", "count")]).to_pylist()
    ranked = sorted(counts, key=lambda group: (-group["url_count"], group["latest_status"], group["latest_message"]))

    def some_urls(group: dict, how_many: int) -> list[str]:
        same = pc.and_(pc.equal(unresolved["latest_status"], group["latest_status"]),
                       pc.equal(unresolved["latest_message"], group["latest_message"]))
        return unresolved["url"].filter(same).slice(0, how_many).to_pylist()

    report.reasons = [FailureReason(group["latest_status"], group["latest_message"], group["url_count"],
                                    some_urls(group, examples)) for group in ranked[:max_reasons]]
    if len(ranked) > max_reasons:
        rest = ranked[max_reasons:]
        report.reasons.append(FailureReason("failed", f"{len(rest)} other reasons",
                                            sum(group["url_count"] for group in rest),
                                            [some_urls(group, 1)[0] for group in rest[:examples]]))
    return report


def _unresolved(first, retried):
    """The first-run rows whose URL never succeeded, in first-run order, with `latest_status` and
    `latest_message` (of the URL's latest try: a retry's when it had one) and `retries` (its retries)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    first = first.append_column("row", pa.array(np.arange(first.num_rows, dtype=np.int64)))
    recovered = pc.is_in(first["url"], value_set=_recovered_urls(first, retried))
    failed = first.filter(pc.and_(pc.not_equal(first["status"], "success"), pc.invert(recovered)))
    # Retry rows come in shard order and none of these URLs succeeded: "last" is the latest failure.
    latest = (retried.filter(pc.not_equal(retried["status"], "success"))
              .group_by("url", use_threads=False)
              .aggregate([("status", "last"), ("error_message", "last"), ("url", "count")]))
    joined = failed.join(latest, keys="url", join_type="left outer").sort_by("row")
    message = pc.coalesce(joined["error_message_last"], joined["error_message"], pa.scalar("", pa.string()))
    return (joined.append_column("latest_status", pc.coalesce(joined["status_last"], joined["status"],
                                                              pa.scalar("unknown", pa.string())))
            .append_column("latest_message", message)
            .append_column("retries", pc.coalesce(joined["url_count"], pa.scalar(0, pa.int64()))))


def url_attempts(folder: StoragePath, urls: set[str] | None = None) -> dict[str, list[dict]]:
    """Every try of each URL that ever failed (or of `urls`), in order: {url: [{shard, key, status, error_message}]}."""
    import pyarrow.compute as pc

    first, retried = _split_rows(location(folder), ("url", "key", "status", "error_message"))
    if urls is None:
        failed_first = first["url"].filter(pc.not_equal(first["status"], "success"))
        urls = set(failed_first.to_pylist())
    attempts: dict[str, list[dict]] = {}
    for table in (first, retried):
        wanted = table.filter(pc.is_in(table["url"], value_set=_string_array(urls)))
        for row in wanted.to_pylist():
            attempts.setdefault(row.pop("url"), []).append(row)
    return attempts


def _string_array(values):
    import pyarrow as pa

    return pa.array(sorted(values), pa.string())


def report_scan(name: str, root: StoragePath, dataset_dir: StoragePath, folders: dict[str, StoragePath]):
    """A Scan (no samples) of img2dataset output folders: per split, the success rate (info), each failure
    reason with its count and example URLs (warnings), and a folder no shard finished in (error)."""
    problems: list[Problem] = []
    counts: dict[str, int] = {}
    for split, folder in folders.items():
        where = _relative(folder, root)
        if not completed_shards(folder):
            problems.append(Problem("not_downloaded", "error", where, split=split,
                                    detail=f"no img2dataset shard has finished in {folder}"))
            continue
        report = split_report(folder, split)
        counts.update({f"{split}_urls": report.rows, f"{split}_downloaded": report.downloaded,
                       f"{split}_failed": report.failed, f"{split}_recovered_by_retry": report.recovered,
                       f"{split}_shards": report.shards, f"{split}_retry_shards": report.retry_shards})
        recovered = f", {report.recovered:,} of them on a retry" if report.recovered else ""
        problems.append(Problem("success_rate", "info", where, split=split,
                                detail=f"{report.downloaded:,} of {report.rows:,} URLs downloaded "
                                       f"({report.success_rate:.1%}){recovered}"))
        for reason in report.reasons:
            problems.append(Problem(reason.status, "warning", where, split=split, count=reason.count,
                                    detail=f"{reason.count:,} URL{'' if reason.count == 1 else 's'}: "
                                           f"{reason.message or '(no message)'} (e.g. {', '.join(reason.examples)})"))
        if report.unfinished:
            problems.append(Problem("unfinished_shards", "warning", where, split=split,
                                    detail=f"shards {', '.join(map(shard_name, report.unfinished[:10]))} have no "
                                           "stats file: interrupted or still being written (their rows are not "
                                           "counted)"))
    return Scan(name, location(root), location(dataset_dir), [], problems, counts)


def _relative(path: StoragePath, root: StoragePath) -> str:
    """`path` relative to `root`, which holds it (on disk or in object storage alike)."""
    return str(path)[len(str(root)):].lstrip("/") or "."
