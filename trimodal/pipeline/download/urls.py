"""URL lists downloaded with img2dataset into webdataset shards: resumable runs, retries of the URLs that
failed (reading what those runs left is `url_report.py`).

For shard K of an output folder img2dataset writes `K.tar` (the samples that succeeded), `K.parquet`
(one row per URL tried: caption, url, key, status, error_message, …) and, last, `K_stats.json`: a shard
is finished when its stats file exists. A sample's key is `K * 10**ceil(log10(samples_per_shard)) + its
row in the shard`, so retried URLs go into new shards numbered after every existing one (img2dataset's
"extend" mode) with the same samples per shard, and their keys cannot repeat a key of an earlier run.
What trimodal adds to a split folder lives in its `_trimodal/` folder: img2dataset reads every top-level
`*.json` of the folder as some shard's stats.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from trimodal.errors import ConfigError, DownloadError
from trimodal.progress import SILENT, Reporter
from trimodal.storage import StoragePath, is_remote, listing, make_folder, open_atomic, prepare_folder, storage_errors
from trimodal.pipeline.download.url_report import (RECORD_DIR, SHARD_DIGITS, STATS, SplitReport, _report, _split_rows,
                                          _unresolved, completed_shards, read_split_record, shard_name,
                                          split_report, unfinished_shards, write_split_record)

if __name__ in ("__main__", "__mp_main__"):  # the img2dataset child process and its spawned workers
    # Each of these processes imports img2dataset, which imports torch (through webdataset) and wandb:
    # ~4 s of CPU and a few hundred MB per process, for neither is used. webdataset only imports torch
    # when present (webdataset/pytorch.py falls back), and img2dataset touches wandb only with
    # enable_wandb=True, which we never pass: an empty module stands in for it.
    import types

    sys.modules.setdefault("torch", None)
    sys.modules.setdefault("wandb", types.ModuleType("wandb"))

SAMPLES_PER_SHARD = 10_000  # img2dataset's default: 9-digit keys
URL_LIST = "urls.parquet"
RETRY_LIST = "retry-urls.parquet"
NOT_IMPORTABLE = 3  # exit status of the child process when img2dataset does not import
_POLL_SECONDS = 0.25
_REMOTE_POLL_SECONDS = 2.0  # a listing of object storage is a request: fewer of them
_STOP_SECONDS = 20.0
_LOG_TAIL_LINES = 15


class UrlDownloadError(DownloadError):
    """img2dataset cannot run here, or stopped with an error, or cannot write its output folder."""


@dataclass(frozen=True)
class Img2datasetOptions:
    """How img2dataset runs: the cc3m recipe's resizing (border to 256 px, jpg), our parallelism."""

    processes: int = 1
    threads: int = 64
    image_size: int = 256
    timeout: float = 10.0  # seconds per URL
    samples_per_shard: int = SAMPLES_PER_SHARD
    # img2dataset's own distributor: multiprocessing (this machine), ray (a ray cluster: RAY_ADDRESS, or a
    # local one) or pyspark (the active Spark session, or a local one; needs Java).
    distributor: str = "multiprocessing"

    def check(self) -> None:
        counts = {"processes": self.processes, "threads": self.threads, "image_size": self.image_size,
                  "samples_per_shard": self.samples_per_shard}
        problems = [f"{name} must be at least 1 (got {value})" for name, value in counts.items() if value < 1]
        if self.timeout <= 0:
            problems.append(f"timeout must be positive (got {self.timeout})")
        if problems:
            raise ConfigError("img2dataset: " + "; ".join(problems))
        check_distributor(self.distributor)

    def arguments(self, url_list: StoragePath, output: StoragePath, mode: str) -> dict:
        """Keyword arguments of `img2dataset.download` for one URL list (a parquet: caption, url)."""
        return dict(url_list=str(url_list), input_format="parquet", url_col="url", caption_col="caption",
                    output_format="webdataset", output_folder=str(output), processes_count=self.processes,
                    thread_count=self.threads, image_size=self.image_size, resize_mode="border",
                    encode_format="jpg", number_sample_per_shard=self.samples_per_shard, timeout=self.timeout,
                    oom_shard_count=SHARD_DIGITS, incremental_mode=mode, enable_wandb=False,
                    distributor=self.distributor)


DISTRIBUTORS = ("multiprocessing", "ray", "pyspark")


def check_distributor(name: str) -> None:
    """A ConfigError unless img2dataset can use the distributor `name` here (its package importable; Java
    for pyspark). img2dataset itself would quietly do nothing with ray missing."""
    if name not in DISTRIBUTORS:
        raise ConfigError(f"--distributor {name!r}: img2dataset distributes with {', '.join(DISTRIBUTORS)}")
    if name == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError("--distributor ray needs ray in this environment: pip install 'ray[default]' (and set "
                          "RAY_ADDRESS to use a running cluster; without it a local one is started)")
    if name == "pyspark":
        if importlib.util.find_spec("pyspark") is None:
            raise ConfigError("--distributor pyspark needs pyspark in this environment: pip install pyspark "
                              "(and Java: apt-get install default-jre-headless)")
        if not (os.environ.get("JAVA_HOME") or shutil.which("java")):
            raise ConfigError("--distributor pyspark needs Java (no java on PATH and no JAVA_HOME): "
                              "apt-get install default-jre-headless")


@dataclass(frozen=True)
class UrlList:
    """One split's URLs: a parquet with columns caption and url, and the folder img2dataset writes them to."""

    parquet: StoragePath
    rows: int
    output: StoragePath


def url_list_path(output: StoragePath) -> StoragePath:
    """Where a split's URL list is kept: in its output folder's `_trimodal/`."""
    return output / RECORD_DIR / URL_LIST


@dataclass(frozen=True)
class Img2datasetJob:
    split: str
    url_list: StoragePath
    output: StoragePath
    rows: int  # URLs this run downloads: the progress total
    mode: str = "incremental"  # or "extend": new shards numbered after the existing ones


def _last_shard(folder: StoragePath) -> int:
    """The highest shard number with a stats file, as img2dataset's "extend" mode counts (by name); -1 if none."""
    return max((int(match.group(1)) for path in listing(folder, "*_stats.json")
                 if (match := STATS.fullmatch(path.name))), default=-1)


def _remove_shard(folder: StoragePath, number: int) -> None:
    for suffix in (".tar", ".parquet", "_stats.json"):
        (folder / (shard_name(number) + suffix)).unlink(missing_ok=True)


def check_output_folder(folder: StoragePath) -> None:
    """Make `folder` (an img2dataset output folder) or say in one line why it cannot be written."""
    probe = folder / RECORD_DIR / ".write-test"
    if is_remote(folder):
        with storage_errors(f"cannot write img2dataset's output folder {folder}"):
            prepare_folder(folder)
            probe.write_bytes(b"")
            probe.unlink()
    else:
        try:
            make_folder(folder / RECORD_DIR)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise UrlDownloadError(f"cannot write img2dataset's output folder {folder}: "
                                   f"{error.strerror or error}") from error
    foreign = sorted(path.name for path in listing(folder, "*.json") if not STATS.fullmatch(path.name))
    if foreign:
        raise UrlDownloadError(f"{folder} holds {', '.join(foreign)}: img2dataset reads every *.json there as a "
                               "shard's stats (NNNNN_stats.json) and would stop; move those files elsewhere")


def prepare_split(folder: StoragePath, rows: int, options: Img2datasetOptions) -> int:
    """How many of a `rows`-row URL list's rows are still to download into `folder`.

    img2dataset skips every shard that has a stats file, so shards holding fewer rows than the list now
    gives them (written with a smaller --max-samples) are removed, to be written again; so are the files of
    shards that never finished (an interrupted run or retry), which no reader may take for whole shards.
    """
    record = read_split_record(folder)
    for name, value in (("samples_per_shard", options.samples_per_shard), ("image_size", options.image_size)):
        if record.get(name, value) != value:
            raise ConfigError(f"{folder} was downloaded with {name} {record[name]}, not {value}: its shards cannot "
                              f"be mixed (keep {record[name]}, or remove {folder} to start again)")
    done = completed_shards(folder)
    for number in unfinished_shards(folder, done):
        _remove_shard(folder, number)
    retry_shards = [number for number in record.get("retry_shards", []) if number in done]
    per_shard = options.samples_per_shard
    shards = math.ceil(rows / per_shard)
    if retry_shards and shards > min(retry_shards):
        raise ConfigError(f"{folder} holds retried URLs in shard {shard_name(min(retry_shards))}, which {rows:,} rows "
                          f"would need for their own; download at most {min(retry_shards) * per_shard:,} rows "
                          f"(--max-samples) into it, or remove {folder} to start again")
    write_split_record(folder, {**record, "samples_per_shard": per_shard, "image_size": options.image_size,
                                 "retry_shards": retry_shards})
    todo = 0
    for number in range(shards):
        expected = min(per_shard, rows - number * per_shard)
        if done.get(number, {}).get("count", 0) < expected:
            _remove_shard(folder, number)  # also a stats file that does not parse
            todo += expected
    return todo


def missing_shards(folder: StoragePath, rows: int, samples_per_shard: int) -> list[int]:
    """Shards of a `rows`-row URL list that img2dataset has not finished in `folder`."""
    done = completed_shards(folder)
    return [number for number in range(math.ceil(rows / samples_per_shard)) if number not in done]


# --- running img2dataset ---------------------------------------------------------------------------------


def run_img2dataset(jobs: list[Img2datasetJob], options: Img2datasetOptions, *, log: Path,
                    reporter: Reporter = SILENT) -> None:
    """Run img2dataset on each job in turn, its progress read from the stats files it writes as shards finish.

    It runs in a child process (calling `img2dataset.download`) whose output goes to `log`: img2dataset
    prints from its worker processes, draws tqdm bars, and replaces the SIGINT handler with one that
    exits with status 0, none of which may reach the caller. A stop signal or Ctrl-C (Stopped, KeyboardInterrupt) stops the child
    and its workers and is raised again; finished shards stay, and a rerun continues after them.
    """
    if not jobs:
        return
    options.check()
    if importlib.util.find_spec("img2dataset") is None:
        raise UrlDownloadError(f"img2dataset is not importable by {sys.executable}: install it "
                               "(pip install 'img2dataset>=1.45') and run the same command again")
    arguments = [{"split": job.split, **options.arguments(job.url_list, job.output, job.mode)} for job in jobs]
    package_parent = str(Path(__file__).resolve().parents[3])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")])),
           "NO_ALBUMENTATIONS_UPDATE": "1", "TQDM_DISABLE": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    before = {job.split: set(completed_shards(job.output)) for job in jobs}
    poll = _REMOTE_POLL_SECONDS if any(is_remote(job.output) for job in jobs) else _POLL_SECONDS
    with open(log, "a", encoding="utf-8") as log_file:
        log_file.write(f"\n=== trimodal {time.strftime('%Y-%m-%d %H:%M:%S')}: img2dataset for "
                       f"{', '.join(job.split for job in jobs)}\n")
        log_file.flush()
        child = subprocess.Popen([sys.executable, "-m", __name__, json.dumps(arguments)], stdin=subprocess.DEVNULL,
                                 stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            _follow(child, jobs, before, reporter, poll)
        except BaseException:
            _stop(child)
            raise
    if child.returncode == NOT_IMPORTABLE:
        raise UrlDownloadError(f"img2dataset does not import in {sys.executable}: {_log_tail(log, 1)} "
                               f"(install it: pip install 'img2dataset>=1.45')")
    if child.returncode != 0:
        raise UrlDownloadError(f"img2dataset stopped with exit status {child.returncode}; the end of its log "
                               f"{log}:\n{_log_tail(log, _LOG_TAIL_LINES)}")


def _follow(child: subprocess.Popen, jobs: list[Img2datasetJob], before: dict[str, set], reporter: Reporter,
            poll: float) -> None:
    tasks = {job.split: reporter.task(f"img2dataset {job.split}", total=job.rows, unit="URLs") for job in jobs}
    seen = {split: set(numbers) for split, numbers in before.items()}
    tally = {job.split: Counter() for job in jobs}
    succeeded = False
    try:
        while True:
            finished = child.poll() is not None
            for job in jobs:
                for number, stats in completed_shards(job.output, skip=seen[job.split]).items():
                    seen[job.split].add(number)
                    tally[job.split].update(ok=stats.get("successes", 0), tried=stats.get("count", 0))
                    counts = tally[job.split]
                    tasks[job.split].update(description=f"img2dataset {job.split}: {counts['ok']:,} ok, "
                                                        f"{counts['tried'] - counts['ok']:,} failed")
                    tasks[job.split].advance(stats.get("count", 0))
            if finished:
                succeeded = child.returncode == 0
                return
            time.sleep(poll)
    finally:
        for task in tasks.values():
            task.close(finished=succeeded)


def _stop(child: subprocess.Popen) -> None:
    """Stop the child as Ctrl-C would (img2dataset cleans its temporary files), then anything left of its group."""
    try:
        os.killpg(child.pid, signal.SIGINT)
        child.wait(_STOP_SECONDS)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        pass
    try:  # its worker processes share its process group (a session of its own)
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    child.wait()


def _log_tail(log: Path, lines: int) -> str:
    try:
        text = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def _child(arguments: list[dict]) -> int:
    """The child process: img2dataset's Python API on each job in turn."""
    _stop_with_parent()
    try:
        from img2dataset import download
    except ImportError as error:
        print(f"{type(error).__name__}: {error}", flush=True)
        return NOT_IMPORTABLE
    if any(job.get("distributor") == "ray" for job in arguments):
        import ray

        # RAY_ADDRESS names a running cluster; without it, a local one for this run.
        ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    for job in arguments:
        split = job.pop("split")
        print(f"=== trimodal {time.strftime('%H:%M:%S')}: {split} -> {job['output_folder']} "
              f"({job['incremental_mode']})", flush=True)
        download(**job)
    return 0


def _stop_with_parent() -> None:
    """Stop this process group (img2dataset and its workers) once the process that started it is gone:
    killed, or its terminal closed. Otherwise it would go on writing shards beside a later run."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.killpg(0, signal.SIGINT)  # as Ctrl-C: img2dataset removes its temporary files and exits
        time.sleep(_STOP_SECONDS)
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()


# --- retrying failed URLs --------------------------------------------------------------------------------


@dataclass
class RetryPlan:
    split: str
    folder: StoragePath
    queued: int  # URLs to try again
    exhausted: int  # failed URLs left alone: they have had their attempts
    shards: list[int]  # the new shards they go into
    before: SplitReport


def plan_retry(folder: StoragePath, split: str, max_attempts: int, options: Img2datasetOptions) -> RetryPlan:
    """Queue (in `_trimodal/retry-urls.parquet`) each URL of `folder` that never succeeded and has been tried
    fewer than `max_attempts` times (the first run counts as one), and reserve the shards it goes into."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    first, retried = _split_rows(folder, ("caption", "url", "status", "error_message"))
    unresolved = _unresolved(first, retried)
    before = _report(folder, split, first, unresolved)
    spare = pc.less(pc.add(unresolved["retries"], 1), max_attempts)
    exhausted = pc.count_distinct(unresolved["url"].filter(pc.invert(spare))).as_py()
    queue = (unresolved.filter(spare).group_by("url", use_threads=False)
             .aggregate([("row", "min"), ("caption", "first")]).sort_by("row_min"))
    record = read_split_record(folder)
    start = _last_shard(folder) + 1  # where img2dataset's "extend" mode numbers them from
    shards = list(range(start, start + math.ceil(queue.num_rows / options.samples_per_shard)))
    if queue.num_rows:
        make_folder(folder / RECORD_DIR)
        with open_atomic(folder / RECORD_DIR / RETRY_LIST) as handle:
            pq.write_table(pa.table({"caption": queue["caption_first"], "url": queue["url"]}), handle)
        record["retry_shards"] = sorted(set(record.get("retry_shards", [])) | set(shards))
        write_split_record(folder, record)  # before img2dataset starts: an interrupted retry is still known
    return RetryPlan(split, folder, queue.num_rows, exhausted, shards, before)


def finish_retry(plan: RetryPlan, max_attempts: int) -> dict:
    """Record a retry run in the split's record and say what it changed."""
    after = split_report(plan.folder, plan.split)
    done = completed_shards(plan.folder)
    summary = {"queued": plan.queued, "exhausted": plan.exhausted, "max_attempts": max_attempts,
               "shards": plan.shards, "unfinished_shards": [n for n in plan.shards if n not in done],
               "downloaded_before": plan.before.downloaded, "downloaded_after": after.downloaded,
               "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    record = read_split_record(plan.folder)
    record.setdefault("retries", []).append(summary)
    write_split_record(plan.folder, record)
    (plan.folder / RECORD_DIR / RETRY_LIST).unlink(missing_ok=True)
    return summary


# --- the whole step --------------------------------------------------------------------------------------


def download_url_lists(url_lists: dict[str, UrlList], options: Img2datasetOptions, *, log: Path,
                       retry_failed: bool = False, max_attempts: int = 3, command: str = "the same command",
                       reporter: Reporter = SILENT) -> dict:
    """Download each split's URL list into its output folder, continuing what an earlier run finished;
    then, with `retry_failed`, try the URLs that failed again (up to `max_attempts` tries per URL in all).

    Returns the details for the download record (JSON-able): `complete` (every shard of every list
    finished), `ran` (img2dataset was started), `problem`, and per split its report and retry summary.
    """
    options.check()
    if max_attempts < 1:
        raise ConfigError(f"--retries must be at least 1 (got {max_attempts})")
    folders = {split: url_list.output for split, url_list in url_lists.items()}
    jobs = []
    for split, url_list in url_lists.items():
        check_output_folder(folders[split])
        todo = prepare_split(folders[split], url_list.rows, options)
        if todo:
            jobs.append(Img2datasetJob(split, url_list.parquet, folders[split], todo))
    run_img2dataset(jobs, options, log=log, reporter=reporter)
    details = {"complete": True, "ran": bool(jobs), "problem": None, "image_size": options.image_size,
               "samples_per_shard": options.samples_per_shard, "log": str(log), "splits": {}}
    missing = {split: missing_shards(folders[split], url_list.rows, options.samples_per_shard)
               for split, url_list in url_lists.items()}
    missing = {split: numbers for split, numbers in missing.items() if numbers}
    if missing:
        listed = "; ".join(f"{split}: {len(numbers)} shard(s) ({', '.join(map(shard_name, numbers[:5]))}"
                           f"{', …' if len(numbers) > 5 else ''})" for split, numbers in missing.items())
        details.update(complete=False, problem=f"img2dataset finished without {listed}; see {log}, then run "
                                               f"{command} again to continue")
    retries = {}
    if retry_failed and not missing:
        plans = [plan_retry(folders[split], split, max_attempts, options) for split in url_lists]
        retry_jobs = [Img2datasetJob(plan.split, plan.folder / RECORD_DIR / RETRY_LIST, plan.folder, plan.queued,
                                     mode="extend") for plan in plans if plan.queued]
        run_img2dataset(retry_jobs, options, log=log, reporter=reporter)
        details["ran"] = details["ran"] or bool(retry_jobs)
        retries = {plan.split: finish_retry(plan, max_attempts) for plan in plans}
    for split in url_lists:
        details["splits"][split] = split_report(folders[split], split).to_dict()
        if split in retries:
            details["splits"][split]["retry"] = retries[split]
    return details


if __name__ == "__main__":
    sys.exit(_child(json.loads(sys.argv[1])))
