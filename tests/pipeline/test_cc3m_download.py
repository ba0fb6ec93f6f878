"""`mm download cc3m`: the GCC TSVs fetched as plain files, then img2dataset run for real against a loopback web
where some URLs 404, some serve a page that is not an image and some answer too slowly; an interrupted
run resumed, `--retry-failed` after the web is fixed, and the report `mm validate cc3m` prints.

Plain-file downloads (any file that is not an archive: TSV, JSON, .npy) are specified here too.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.builders import md5
from tests.web_builders import ImageServer, UrlWorld, build_url_world, fix, serve_images, url_path
from trimodal.errors import ChecksumError, ConfigError, DatasetLayoutError, DiskSpaceError, ManifestError
from trimodal.pipeline import datasets as datasets_module
from trimodal.pipeline.download import archives as download_module
from trimodal.pipeline.download import osf
from trimodal.pipeline.download.archives import DOWNLOADS, RECORDED, DownloadResult
from trimodal.pipeline.datasets import download_dataset
from trimodal.pipeline.download.fetch import FetchPolicy
from trimodal.pipeline.download.manifest import Archive, Manifest, load_manifest, parse_manifest
from trimodal.pipeline.download.marker import read_marker, read_state
from trimodal.pipeline.sources import cc3m, scan_source
from trimodal.pipeline.download.urls import (
    Img2datasetJob,
    Img2datasetOptions,
    UrlDownloadError,
    check_output_folder,
    plan_retry,
    prepare_split,
    run_img2dataset,
)
from trimodal.pipeline.download.url_report import RECORD_DIR, split_report, url_attempts
from trimodal.progress import Reporter, Task

FAST = FetchPolicy(attempts_per_url=2, backoff_seconds=0.01, timeout_seconds=10)
# Shards of 4 URLs: o = image, m = 404, n = not an image, s = slower than the 1 s timeout. Shard 1's slow
# URL keeps it busy for a second after shard 0 is finished, which is when the first run is interrupted.
TRAIN_KINDS = "oomo" + "noos" + "mo"
VAL_KINDS = "ooo"
SAMPLES_PER_SHARD = 4
OPTIONS = {"processes": 1, "threads": 8}
NOT_FOUND = "HTTP Error 404: Not Found"


# --- the story of one cc3m download (img2dataset runs three times in all, ~40 s on 2 cores) -------------


class Interrupter(Reporter):
    """Collects notes; presses Ctrl-C (raises KeyboardInterrupt) when img2dataset's first shard is finished."""

    def __init__(self, interrupt: bool):
        self.interrupt = interrupt
        self.notes: list[tuple[str, str]] = []

    def task(self, description: str, total=None, unit: str = "items") -> Task:
        reporter = self

        class Watch(Task):
            def advance(self, amount: float = 1) -> None:
                if reporter.interrupt and description.startswith("img2dataset"):
                    raise KeyboardInterrupt

        return Watch()

    def note(self, message: str, level: str = "info") -> None:
        self.notes.append((message, level))


@dataclass
class Story:
    root: Path
    server: ImageServer
    train: UrlWorld
    val: UrlWorld
    first_notes: list
    after_interrupt: dict  # read_state right after Ctrl-C
    stats_after_interrupt: dict[str, int]  # train stats file -> mtime_ns
    requests_after_interrupt: Counter
    resumed: DownloadResult
    requests_after_resume: Counter
    log_after_resume: str
    noop: DownloadResult
    requests_after_noop: Counter
    log_after_noop: str
    retried: DownloadResult
    retried_again: DownloadResult
    requests_after_second_retry: Counter
    files_after_retry: list[str]
    files_after_second_retry: list[str]

    @property
    def dataset(self) -> Path:
        return self.root / "cc3m"


@pytest.fixture(scope="module")
def small_shards():
    """Shards of 4 URLs and a 1 s timeout per URL, for every cc3m download in this module."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cc3m, "SAMPLES_PER_SHARD", SAMPLES_PER_SHARD)
        patch.setattr(cc3m, "TIMEOUT_SECONDS", 1.0)
        yield


def _stats_mtimes(folder: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in sorted(folder.glob("*_stats.json"))}


def _files(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


@pytest.fixture(scope="module")
def story(tmp_path_factory, small_shards):
    root = tmp_path_factory.mktemp("cc3m-data")
    with serve_images() as server:
        train = build_url_world(server, "train", TRAIN_KINDS, slow_seconds=3.0)
        val = build_url_world(server, "val", VAL_KINDS, seed=1)
        server.files["/" + cc3m.TSV_FILES["train"]] = train.tsv
        server.files["/" + cc3m.TSV_FILES["val"]] = val.tsv

        def download(reporter: Reporter = Interrupter(False), **options) -> DownloadResult:
            return download_dataset("cc3m", root, mirror=server.url, download_options={**OPTIONS, **options},
                                    reporter=reporter, policy=FAST)

        first = Interrupter(True)
        with pytest.raises(KeyboardInterrupt):
            download(first)
        after_interrupt = read_state(root / "cc3m")
        stats_after_interrupt = _stats_mtimes(root / "cc3m" / "train")
        requests_after_interrupt = Counter(server.requests)

        resumed = download()
        requests_after_resume = Counter(server.requests)
        log_after_resume = (root / "cc3m" / cc3m.LOG).read_text()
        noop = download()
        requests_after_noop = Counter(server.requests)
        log_after_noop = (root / "cc3m" / cc3m.LOG).read_text()

        fix(server, [train.missing[0], *train.not_image, *train.slow])  # train.missing[1] stays 404
        retried = download(retry_failed=True)
        files_after_retry = _files(root / "cc3m")
        retried_again = download(retry_failed=True, retries=2)
        yield Story(root, server, train, val, first.notes, after_interrupt, stats_after_interrupt,
                    requests_after_interrupt, resumed, requests_after_resume, log_after_resume, noop,
                    requests_after_noop, log_after_noop, retried, retried_again, Counter(server.requests),
                    files_after_retry, _files(root / "cc3m"))


def test_the_tsvs_are_kept_as_published_and_their_sha256_recorded_on_first_download(story):
    for split, world in (("train", story.train), ("val", story.val)):
        assert (story.dataset / cc3m.TSV_FILES[split]).read_bytes() == world.tsv
    recorded = json.loads((story.root / RECORDED).read_text())
    assert recorded == {cc3m.TSV_FILES[split]: hashlib.sha256(world.tsv).hexdigest()
                        for split, world in (("train", story.train), ("val", story.val))}
    assert sum("no published checksum" in message for message, level in story.first_notes if level == "warning") == 2
    assert all(archive.plain and archive.verified for archive in story.resumed.archives)
    assert not (story.root / DOWNLOADS).exists()


def test_an_interrupted_run_leaves_the_download_incomplete(story):
    assert story.after_interrupt["complete"] is False
    assert story.after_interrupt["download_step"]["complete"] is False
    assert set(story.after_interrupt["archives"]) == set(cc3m.TSV_FILES.values())  # the TSVs are kept
    assert list(story.stats_after_interrupt) == ["00000_stats.json"]


def test_the_rerun_continues_after_the_finished_shards_without_redoing_them(story):
    train = story.dataset / "train"
    assert _stats_mtimes(train)["00000_stats.json"] == story.stats_after_interrupt["00000_stats.json"]
    first_shard = [url_path(url) for _, url in story.train.lines[:SAMPLES_PER_SHARD]]
    assert all(story.requests_after_resume[path] == 1 for path in first_shard)
    assert sorted(_stats_mtimes(train))[:3] == ["00000_stats.json", "00001_stats.json", "00002_stats.json"]
    assert story.resumed.step["complete"] and not story.resumed.already_complete


def test_failures_are_counted_by_reason_per_split(story):
    train = story.resumed.step["splits"]["train"]
    assert (train["rows"], train["downloaded"], train["failed"]) == (10, 6, 4)
    reasons = {(reason["status"], reason["message"]): reason for reason in train["reasons"]}
    assert reasons[("failed_to_download", NOT_FOUND)]["count"] == 2
    assert sorted(reasons[("failed_to_download", NOT_FOUND)]["examples"]) == sorted(story.train.missing)
    assert reasons[("failed_to_resize", "Image decoding error")]["examples"] == story.train.not_image
    (timeout,) = [reason for (_, message), reason in reasons.items() if "timed out" in message]
    assert timeout["examples"] == story.train.slow
    val = story.resumed.step["splits"]["val"]
    assert (val["rows"], val["downloaded"], val["reasons"]) == (3, 3, [])


def test_the_download_record_keeps_what_the_step_did(story):
    record = read_marker(story.root, "cc3m")
    assert record["complete"] is True
    step = record["download_step"]
    assert step["options"] == {**OPTIONS, "retry_failed": True, "retries": 2}
    assert step["image_size"] == 256 and step["samples_per_shard"] == SAMPLES_PER_SHARD
    assert step["splits"]["train"]["downloaded"] == 9


def test_a_complete_download_is_a_no_op(story):
    assert story.noop.already_complete
    assert story.requests_after_noop == story.requests_after_resume
    assert story.log_after_noop == story.log_after_resume  # img2dataset was not started


def test_retry_failed_downloads_the_urls_that_work_now_into_new_shards(story):
    train = story.retried.step["splits"]["train"]
    assert train["retry"]["queued"] == 4 and train["retry"]["shards"] == [3]
    assert (train["retry"]["downloaded_before"], train["retry"]["downloaded_after"]) == (6, 9)
    assert (story.dataset / "train" / "00003.tar").is_file()
    assert (story.dataset / "train" / "00003_stats.json").is_file()
    assert story.retried.step["splits"]["val"]["retry"]["queued"] == 0
    assert not (story.dataset / "val" / "00001.tar").exists()  # nothing to retry: img2dataset not run for val


def test_a_url_that_succeeds_on_a_retry_is_counted_once(story):
    report = split_report(story.dataset / "train", "train")
    assert (report.rows, report.downloaded, report.recovered, report.failed) == (10, 9, 3, 1)
    assert [(reason.message, reason.count, reason.examples) for reason in report.reasons] == \
        [(NOT_FOUND, 1, [story.train.missing[1]])]


def _keys(folder: Path) -> tuple[list[str], list[str]]:
    """(keys of the samples in every tar, keys of the rows of every parquet)."""
    tar_keys, row_keys = [], []
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            tar_keys += sorted({member.name.split(".")[0] for member in tar.getmembers()})
    for path in sorted(folder.glob("*.parquet")):
        row_keys += pq.read_table(path, columns=["key"])["key"].to_pylist()
    return tar_keys, row_keys


def test_retry_shard_keys_cannot_repeat_a_first_run_key(story):
    tar_keys, row_keys = _keys(story.dataset / "train")
    assert len(row_keys) == len(set(row_keys)) == 10 + 4
    assert len(tar_keys) == len(set(tar_keys)) == 9
    # img2dataset's key: shard * 10**ceil(log10(samples per shard)) + row, in 1 + 5 digits here
    retry_rows = pq.read_table(story.dataset / "train" / "00003.parquet", columns=["key"])["key"].to_pylist()
    assert sorted(retry_rows) == [f"{3 * 10 + row:06d}" for row in range(4)]
    assert max(key for key in row_keys if key not in retry_rows) < min(retry_rows)


def test_each_attempt_of_a_url_keeps_its_reason(story):
    attempts = url_attempts(story.dataset / "train")
    still_missing, fixed = story.train.missing[1], story.train.missing[0]
    assert [(a["status"], a["error_message"]) for a in attempts[still_missing]] == \
        [("failed_to_download", NOT_FOUND)] * 2
    assert [a["status"] for a in attempts[fixed]] == ["failed_to_download", "success"]
    assert [a["shard"] for a in attempts[fixed]] == [0, 3]


def test_urls_out_of_tries_are_not_queued_again(story):
    retry = story.retried_again.step["splits"]["train"]["retry"]
    assert (retry["queued"], retry["exhausted"], retry["shards"]) == (0, 1, [])
    assert story.retried_again.already_complete  # img2dataset was not started
    assert story.files_after_second_retry == story.files_after_retry  # no new shard
    assert story.requests_after_second_retry[url_path(story.train.missing[1])] == 2


def test_validate_reports_success_rates_and_failure_reasons(story):
    scan = scan_source("cc3m", story.root)
    assert scan.samples == []
    assert (scan.counts["train_pairs"], scan.counts["train_urls"], scan.counts["train_downloaded"]) == (10, 10, 9)
    assert scan.counts["train_recovered_by_retry"] == 3 and scan.counts["train_retry_shards"] == 1
    (rate,) = [p for p in scan.problems if p.kind == "success_rate" and p.split == "train"]
    assert rate.severity == "info" and "9 of 10" in rate.detail and "90.0%" in rate.detail
    (missing,) = [p for p in scan.problems if p.kind == "failed_to_download"]
    assert missing.severity == "warning" and missing.detail.startswith(f"1 URL: {NOT_FOUND}")
    assert story.train.missing[1] in missing.detail
    assert not [p for p in scan.problems if p.severity == "error"]
    assert {p.kind for p in scan.problems if p.severity == "warning"} == {"failed_to_download", "count_differs"}


@pytest.fixture
def story_copy(story, tmp_path) -> Path:
    shutil.copytree(story.root, tmp_path / "data")
    return tmp_path / "data"


def test_cli_retry_failed_shows_before_and_after(story, story_copy, mm):
    result = mm("download", "cc3m", "--root", story_copy, "--mirror", story.server.url, "--retry-failed",
                "--retries", "2", "--processes", "1")
    assert result.exit_code == 0, result.output
    assert "before → after" in result.out and "9 → 9" in result.out
    assert NOT_FOUND in result.out and "1 out of tries" in result.out


def test_cli_download_of_a_complete_cc3m_says_so(story, story_copy, mm):
    result = mm("download", "cc3m", "--root", story_copy, "--mirror", story.server.url)
    assert result.exit_code == 0, result.output
    assert "already complete" in result.out


def test_cli_validate_prints_the_failure_reasons(story_copy, mm):
    result = mm("validate", "cc3m", "--root", story_copy)
    assert result.exit_code == 0, result.output
    assert "failed_to_download" in result.out and "train_downloaded" in result.out


# --- the step's parts, without a loopback web -----------------------------------------------------------


def test_processes_on_a_dataset_without_a_download_step_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"--processes does not apply to flickr8k \(it applies to cc3m\)"):
        download_dataset("flickr8k", tmp_path, download_options={"processes": 2})
    with pytest.raises(ConfigError, match=r"--max-samples does not apply to facc"):
        download_dataset("facc", tmp_path, download_options={"max_samples": 2})
    assert not list(tmp_path.iterdir())


def test_cli_processes_on_flickr8k_is_one_red_line(tmp_path, mm):
    result = mm("download", "flickr8k", "--root", tmp_path, "--processes", "2")
    assert result.exit_code == 1
    assert "--processes does not apply to flickr8k" in result.err


def test_retries_without_retry_failed_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="--retries only applies with --retry-failed"):
        cc3m.download_cc3m(tmp_path, retries=2)


def _write_tsv(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_a_tsv_line_without_two_fields_names_the_file_and_line(tmp_path):
    tsv = _write_tsv(tmp_path / cc3m.TSV_FILES["val"],
                     ["a cat .\thttp://x/1.jpg", "a dog .\thttp://x/2.jpg", "broken\tline\twith three", "no tab"])
    with pytest.raises(DatasetLayoutError, match=r"Validation_GCC-1\.1\.0-Validation\.tsv: 2 line\(s\).*"
                                                 r"line 3 has 3 field\(s\); line 4 has 1 field"):
        cc3m.write_url_list(tsv, tmp_path / "urls.parquet", None)
    assert not (tmp_path / "urls.parquet").exists()


def test_a_tsv_is_read_with_no_header_and_no_quoting(tmp_path):
    tsv = _write_tsv(tmp_path / "t.tsv", ['the word " on a sign\thttp://x/1.jpg', '"quoted" caption\thttp://x/2.jpg',
                                          "12\thttp://x/3.jpg"])
    table = cc3m.read_tsv(tsv)
    assert table.column_names == ["caption", "url"]
    assert table["caption"].to_pylist() == ['the word " on a sign', '"quoted" caption', "12"]


def test_max_samples_limits_the_url_list_and_a_new_limit_rewrites_it(tmp_path):
    tsv = _write_tsv(tmp_path / "t.tsv", [f"caption {n} .\thttp://x/{n}.jpg" for n in range(5)])
    parquet = tmp_path / "urls.parquet"
    assert cc3m.write_url_list(tsv, parquet, 2) == 2
    assert pq.read_table(parquet)["url"].to_pylist() == ["http://x/0.jpg", "http://x/1.jpg"]
    before = parquet.stat().st_mtime_ns
    assert cc3m.write_url_list(tsv, parquet, 2) == 2 and parquet.stat().st_mtime_ns == before  # not rewritten
    assert cc3m.write_url_list(tsv, parquet, None) == 5


def _fake_shard(folder: Path, number: int, rows: list[tuple[str, str, str | None]], retry: bool = False) -> None:
    """An img2dataset shard's parquet and stats: rows of (url, status, error_message)."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{number:05d}"
    pq.write_table(pa.table({"caption": [f"c {url}" for url, _, _ in rows], "url": [url for url, _, _ in rows],
                             "key": [f"{number * 10 + row:06d}" for row in range(len(rows))],
                             "status": [status for _, status, _ in rows],
                             "error_message": pa.array([message for _, _, message in rows], pa.string())}),
                   folder / f"{name}.parquet")
    (folder / f"{name}.tar").write_bytes(b"")
    (folder / f"{name}_stats.json").write_text(json.dumps({"count": len(rows), "successes": 0}))
    if retry:
        record_path = folder / RECORD_DIR / "split.json"
        record_path.parent.mkdir(exist_ok=True)
        record = json.loads(record_path.read_text()) if record_path.exists() else {}
        record["retry_shards"] = sorted(set(record.get("retry_shards", [])) | {number})
        record_path.write_text(json.dumps(record))


def test_the_report_reconciles_retries_by_url(tmp_path):
    folder = tmp_path / "train"
    _fake_shard(folder, 0, [("a", "success", None), ("b", "failed_to_download", NOT_FOUND),
                            ("c", "failed_to_download", "timed out"), ("b", "failed_to_download", NOT_FOUND)])
    _fake_shard(folder, 1, [("b", "success", None), ("c", "failed_to_download", "HTTP Error 500: Oops")], retry=True)
    report = split_report(folder, "train")
    assert (report.rows, report.downloaded, report.recovered, report.failed) == (4, 3, 2, 1)
    assert (report.shards, report.retry_shards) == (1, 1)
    assert [(r.message, r.count, r.examples) for r in report.reasons] == [("HTTP Error 500: Oops", 1, ["c"])]


def test_a_retry_queues_each_failed_url_once_until_it_is_out_of_tries(tmp_path):
    folder = tmp_path / "train"
    _fake_shard(folder, 0, [("a", "success", None), ("b", "failed_to_download", NOT_FOUND),
                            ("b", "failed_to_download", NOT_FOUND), ("c", "failed_to_resize", "Image decoding error")])
    _fake_shard(folder, 1, [("c", "failed_to_download", "timed out")], retry=True)
    options = Img2datasetOptions(samples_per_shard=4)
    plan = plan_retry(folder, "train", 3, options)
    assert (plan.queued, plan.exhausted, plan.shards) == (2, 0, [2])
    assert pq.read_table(folder / RECORD_DIR / "retry-urls.parquet")["url"].to_pylist() == ["b", "c"]
    plan = plan_retry(folder, "train", 2, options)
    assert (plan.queued, plan.exhausted) == (1, 1)  # c has had its two tries


def test_shards_shorter_than_the_url_list_now_asks_for_are_downloaded_again(tmp_path):
    folder = tmp_path / "train"
    _fake_shard(folder, 0, [("a", "success", None), ("b", "success", None)])  # a --max-samples 2 run
    assert prepare_split(folder, 6, Img2datasetOptions(samples_per_shard=4)) == 6
    assert not (folder / "00000_stats.json").exists() and not (folder / "00000.tar").exists()


def test_files_of_shards_that_never_finished_are_removed_before_a_run(tmp_path):
    folder = tmp_path / "train"
    _fake_shard(folder, 0, [("a", "success", None)])
    (folder / "00001.tar").write_bytes(b"half a tar")  # an interrupted retry's shard: no stats file
    (folder / "00001.parquet").write_bytes(b"half a parquet")
    assert prepare_split(folder, 1, Img2datasetOptions(samples_per_shard=4)) == 0
    assert sorted(path.name for path in folder.iterdir() if path.is_file()) == \
        ["00000.parquet", "00000.tar", "00000_stats.json"]


def test_more_rows_than_retry_shards_leave_room_for_is_refused(tmp_path):
    folder = tmp_path / "train"
    _fake_shard(folder, 0, [("a", "success", None), ("b", "failed_to_download", NOT_FOUND)])
    _fake_shard(folder, 1, [("b", "success", None)], retry=True)
    with pytest.raises(ConfigError, match="retried URLs in shard 00001"):
        prepare_split(folder, 6, Img2datasetOptions(samples_per_shard=4))


def test_a_different_image_size_than_the_split_was_downloaded_with_is_refused(tmp_path):
    folder = tmp_path / "train"
    prepare_split(folder, 2, Img2datasetOptions(samples_per_shard=4))
    with pytest.raises(ConfigError, match="image_size 256, not 512"):
        prepare_split(folder, 2, Img2datasetOptions(samples_per_shard=4, image_size=512))


def test_an_output_folder_that_cannot_be_made_is_a_clear_error(tmp_path):
    (tmp_path / "train").write_text("a file where the split folder goes")
    with pytest.raises(UrlDownloadError, match=r"cannot write img2dataset's output folder .*train"):
        cc3m.download_cc3m(tmp_path, max_samples=1)


def test_a_stray_json_in_an_output_folder_is_refused_before_img2dataset_trips_on_it(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "notes.json").write_text("{}")
    with pytest.raises(UrlDownloadError, match=r"notes\.json: img2dataset reads every \*\.json"):
        check_output_folder(tmp_path / "train")


def test_img2dataset_that_does_not_import_is_a_clear_error(tmp_path, monkeypatch):
    fake = tmp_path / "shadow" / "img2dataset"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('libGL.so.1: cannot open shared object file')\n")
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))
    job = Img2datasetJob("train", tmp_path / "urls.parquet", tmp_path / "train", rows=1)
    with pytest.raises(UrlDownloadError, match=r"img2dataset does not import in .*libGL\.so\.1"):
        run_img2dataset([job], Img2datasetOptions(), log=tmp_path / "img2dataset.log")


# --- plain files (not archives): moved into the dataset folder as they are ------------------------------

CAPTIONS = json.dumps(["a cat on a mat", "a dog in the fog"]).encode()
VECTORS = b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (2, 4), }" + bytes(32 + 44)


def _plain_manifest(url: str, *, sha256: str | None = None) -> Manifest:
    return Manifest(name="plainfiles", title="plain files", licence="test", terms_url="http://x", archives=(
        Archive(file="captions.json", urls=(f"{url}/captions.json",), unpublished_checksum=True),
        Archive(file="states.npy", urls=(f"{url}/states.npy",), sha256=sha256 or hashlib.sha256(VECTORS).hexdigest(),
                approx_bytes=len(VECTORS)),
    ))


@pytest.fixture
def plain(http_server, monkeypatch):
    http_server.files.update({"/captions.json": CAPTIONS, "/states.npy": VECTORS})
    monkeypatch.setattr(datasets_module, "load_manifest", lambda name: _plain_manifest(http_server.url))
    return http_server


def test_a_plain_file_is_verified_and_moved_into_the_dataset_folder_as_it_is(plain, tmp_path):
    result = download_dataset("plainfiles", tmp_path, policy=FAST)
    assert (tmp_path / "plainfiles" / "captions.json").read_bytes() == CAPTIONS
    assert (tmp_path / "plainfiles" / "states.npy").read_bytes() == VECTORS
    assert [(a.file, a.plain, a.files_extracted) for a in result.archives] == \
        [("captions.json", True, 0), ("states.npy", True, 0)]
    assert result.archives[1].digests == {"sha256": hashlib.sha256(VECTORS).hexdigest()}
    assert read_marker(tmp_path, "plainfiles")["complete"] is True
    assert not (tmp_path / DOWNLOADS).exists()


def test_a_plain_file_transfer_resumes_from_its_part_file(plain, tmp_path):
    (tmp_path / DOWNLOADS).mkdir()
    (tmp_path / DOWNLOADS / "states.npy.part").write_bytes(VECTORS[:50])
    download_dataset("plainfiles", tmp_path, policy=FAST)
    assert [r.range for r in plain.requests_for("/states.npy")] == ["bytes=50-"]
    assert (tmp_path / "plainfiles" / "states.npy").read_bytes() == VECTORS


def test_a_plain_file_with_a_wrong_digest_is_removed_and_not_placed(plain, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets_module, "load_manifest", lambda name: _plain_manifest(plain.url, sha256="0" * 64))
    with pytest.raises(ChecksumError, match="states.npy"):
        download_dataset("plainfiles", tmp_path, policy=FAST)
    assert not (tmp_path / "plainfiles" / "states.npy").exists()
    assert not list((tmp_path / DOWNLOADS).glob("states.npy*"))


def test_a_plain_file_without_a_published_checksum_is_recorded_then_enforced(plain, tmp_path):
    download_dataset("plainfiles", tmp_path, policy=FAST)
    assert json.loads((tmp_path / RECORDED).read_text()) == {"captions.json": hashlib.sha256(CAPTIONS).hexdigest()}
    plain.files["/captions.json"] = b'["changed"]'
    with pytest.raises(ChecksumError, match=hashlib.sha256(CAPTIONS).hexdigest()):
        download_dataset("plainfiles", tmp_path, force=True, policy=FAST)
    assert not (tmp_path / "plainfiles" / "captions.json").exists()


def test_the_space_check_does_not_count_a_plain_file_as_unpacked_twice(plain, tmp_path, monkeypatch):
    monkeypatch.setattr(download_module, "free_bytes", lambda path: len(VECTORS) + len(CAPTIONS) + 10)
    download_dataset("plainfiles", tmp_path, policy=FAST)  # an archive of this size would need about twice that
    monkeypatch.setattr(download_module, "free_bytes", lambda path: 10)
    with pytest.raises(DiskSpaceError, match=r"need about .* still to download\), "):
        download_dataset("plainfiles", tmp_path / "other", policy=FAST)


def test_an_osf_url_is_resolved_through_the_folder_listing_when_the_download_starts(http_server, tmp_path,
                                                                                     monkeypatch):
    http_server.files["/v2/nodes/ad7qg/files/osfstorage/F1/?page%5Bsize%5D=100"] = json.dumps({"data": [
        {"attributes": {"kind": "file", "name": "captions.json"},
         "links": {"download": f"{http_server.url}/download/x1"}}], "links": {"next": None}}).encode()
    http_server.files["/download/x1"] = CAPTIONS
    monkeypatch.setattr(osf, "API", f"{http_server.url}/v2")
    manifest = Manifest(name="plainfiles", title="t", licence="l", terms_url="http://x", archives=(
        Archive(file="captions.json", urls=("osf://ad7qg/F1/captions.json",), unpublished_checksum=True),))
    monkeypatch.setattr(datasets_module, "load_manifest", lambda name: manifest)
    result = download_dataset("plainfiles", tmp_path, policy=FAST)
    assert result.archives[0].url == f"{http_server.url}/download/x1"
    assert (tmp_path / "plainfiles" / "captions.json").read_bytes() == CAPTIONS


def test_keep_on_a_plain_file_is_a_manifest_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('name = "bad"\ntitle = "t"\nlicence = "l"\nterms_url = "https://x"\n[[archives]]\n'
                    f'file = "captions.json"\nurls = ["https://x/captions.json"]\nmd5 = "{md5(b"x")}"\n'
                    'keep = ["*.json"]\n')
    with pytest.raises(ManifestError, match="captions.json is a plain file"):
        parse_manifest(path)


def test_the_cc3m_manifest_names_the_tsvs_by_their_browser_file_names():
    manifest = load_manifest("cc3m")
    assert {a.file: a.urls[0] for a in manifest.archives} == {
        "Train_GCC-training.tsv": "https://storage.googleapis.com/gcc-data/Train/GCC-training.tsv",
        "Validation_GCC-1.1.0-Validation.tsv":
            "https://storage.googleapis.com/gcc-data/Validation/GCC-1.1.0-Validation.tsv"}
    assert all(not a.is_archive and a.unpublished_checksum and not a.digests for a in manifest.archives)
    assert (manifest.counts["train_pairs"], manifest.counts["val_pairs"]) == (3_318_333, 15_840)


def test_cli_part_is_another_name_for_only(tmp_path, mm):
    result = mm("download", "coco2014", "--root", tmp_path, "--part", "pixels", "--mirror", "http://127.0.0.1:9")
    assert result.exit_code == 1
    assert "coco2014 has no part 'pixels'" in result.err


def test_a_refused_option_leaves_a_complete_download_complete(story_copy):
    with pytest.raises(ConfigError, match="image_size 256, not 512"):
        download_dataset("cc3m", story_copy, download_options={"image_size": 512, "processes": 1})
    assert read_marker(story_copy, "cc3m")["complete"] is True


def test_the_downloaded_tars_and_their_retries_are_adopted_as_shards_and_featurized(story, tmp_path, mm):
    """The whole chain: what img2dataset wrote (first run and retries) becomes shards without a copy."""
    import os

    from trimodal.pipeline.read.shards import read_shard

    result = mm("shard", "cc3m", "--root", story.root, "--out", tmp_path / "shards")
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    downloaded = {split: sum(1 for _ in (story.root / "cc3m" / split).glob("*.tar")) for split in ("train", "val")}
    assert {split: len(info["shards"]) for split, info in index["splits"].items()} == downloaded
    samples = 0
    for split, info in index["splits"].items():
        for shard in info["shards"]:
            path = tmp_path / "shards" / shard["name"]
            assert os.path.samefile(path, shard["adopted_from"])
            contents = read_shard(path, audio=False)
            assert len(contents.keys) == shard["samples"] == len(contents.captions)
            samples += shard["samples"]
    report = split_report(story.root / "cc3m" / "train", "train")
    assert index["splits"]["train"]["samples"] == report.downloaded
    result = mm("featurize", tmp_path / "shards", "--out", tmp_path / "f.zarr", "--image", "open_clip:ViT-S-32",
                "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert f"{samples:,}" in result.out


# --- img2dataset's own distributors ----------------------------------------------------------------------


def test_the_ray_distributor_downloads_what_multiprocessing_does(tmp_path, small_shards):
    """img2dataset's ray distributor (a local ray started for the run) against the loopback web: the same
    successes, failures and shard layout as its multiprocessing distributor."""
    pytest.importorskip("ray", reason="ray is not installed (pip install 'ray[default]')")
    results = {}
    with serve_images() as server:
        world = build_url_world(server, "train", "oomo" + "no", slow_seconds=0.0)
        val = build_url_world(server, "val", "oo", seed=1)
        server.files["/" + cc3m.TSV_FILES["train"]] = world.tsv
        server.files["/" + cc3m.TSV_FILES["val"]] = val.tsv
        for distributor in ("multiprocessing", "ray"):
            root = tmp_path / distributor
            result = download_dataset("cc3m", root, mirror=server.url, policy=FAST,
                                      download_options={**OPTIONS, "distributor": distributor})
            assert result.step["complete"] is True, result.step
            report = split_report(root / "cc3m" / "train", "train")
            results[distributor] = (report.rows, report.downloaded, [(r.status, r.message, r.count) for r in report.reasons],
                                    sorted(p.name for p in (root / "cc3m" / "train").glob("*.tar")))
    assert results["ray"] == results["multiprocessing"]
    assert results["ray"][:2] == (6, 4)  # o o m o n o: four images


@pytest.mark.parametrize("distributor, message", [("dask", "distributes with multiprocessing, ray, pyspark"),
                                                  ("pyspark", "pyspark")])
def test_a_distributor_that_cannot_run_here_is_one_clear_error(tmp_path, distributor, message, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyspark" else real(name, *a))
    with pytest.raises(ConfigError, match=message):
        Img2datasetOptions(distributor=distributor).check()
