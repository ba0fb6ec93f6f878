"""`mm download`: fetch a dataset's archives, verify them, extract them safely, mark completion last."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from trimodal import __version__
from trimodal.atomic import write_json
from trimodal.errors import ChecksumError, DiskSpaceError
from trimodal.pipeline.extract import extract_archive
from trimodal.pipeline.fetch import FetchPolicy, fetch, free_bytes, hash_file
from trimodal.pipeline.manifest import Archive, Manifest, load_manifest
from trimodal.progress import SILENT, Reporter

MARKER = ".trimodal-download.json"
DOWNLOADS = ".downloads"


@dataclass
class ArchiveOutcome:
    file: str
    url: str | None
    bytes: int
    digests: dict[str, str]
    verified: bool
    files_extracted: int
    skipped_members: int


@dataclass
class DownloadResult:
    name: str
    target: Path
    already_complete: bool
    archives: list[ArchiveOutcome] = field(default_factory=list)
    synthetic: bool = False


def marker_path(root: Path, name: str) -> Path:
    return root / name / MARKER


def read_marker(root: Path, name: str) -> dict | None:
    """The completion record of `root/name`, or None when that download is not complete."""
    try:
        record = json.loads(marker_path(root, name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if record.get("complete") is True else None


def _write_marker(target: Path, record: dict) -> None:
    write_json(target / MARKER, record, sort_keys=True)


def download_dataset(
    name: str,
    root: Path,
    *,
    mirror: str | None = None,
    verify: bool = True,
    force: bool = False,
    keep_archives: bool = False,
    reporter: Reporter = SILENT,
    policy: FetchPolicy = FetchPolicy(),
) -> DownloadResult:
    """Make `root/name` hold the complete dataset; a complete one is left alone without any request."""
    manifest = load_manifest(name)
    root = Path(root)
    target = root / name
    if force:
        shutil.rmtree(target, ignore_errors=True)
    elif read_marker(root, name):
        return DownloadResult(name, target, already_complete=True, synthetic=manifest.synthetic)

    if manifest.synthetic:
        return _synthesize(manifest, root, reporter)

    target.mkdir(parents=True, exist_ok=True)
    state = _read_state(target)
    if state.get("dataset") not in (None, name) or state.get("verified", verify) != verify:
        state = {}
    state.update({"dataset": name, "complete": False, "verified": verify, "trimodal": __version__})
    state.setdefault("archives", {})
    outcomes = []
    for archive in manifest.archives:
        recorded = state["archives"].get(archive.file)
        if recorded:
            outcomes.append(ArchiveOutcome(**recorded))
            continue
        outcome = _download_archive(archive, root, target, mirror, verify, keep_archives, reporter, policy)
        state["archives"][archive.file] = outcome.__dict__
        _write_marker(target, state)
        outcomes.append(outcome)
    state["complete"] = True
    _write_marker(target, state)
    downloads = root / DOWNLOADS
    if downloads.is_dir() and not any(downloads.iterdir()):
        downloads.rmdir()
    return DownloadResult(name, target, already_complete=False, archives=outcomes)


def _read_state(target: Path) -> dict:
    try:
        return json.loads((target / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _download_archive(
    archive: Archive,
    root: Path,
    target: Path,
    mirror: str | None,
    verify: bool,
    keep_archives: bool,
    reporter: Reporter,
    policy: FetchPolicy,
) -> ArchiveOutcome:
    urls = [mirror.rstrip("/") + "/" + archive.file] if mirror else list(archive.urls)
    local = root / DOWNLOADS / archive.file
    url = None
    if not local.is_file():
        url = fetch(urls, local, reporter=reporter, policy=policy, check_size=_space_check(archive, root))
    size = local.stat().st_size

    digests: dict[str, str] = {}
    if verify:
        with reporter.task(f"verify {archive.file}", total=size, unit="bytes") as task:
            digests = hash_file(local, list(archive.digests), task)
        for algorithm, expected in archive.digests.items():
            if digests[algorithm] != expected:
                local.unlink()
                raise ChecksumError(str(local), algorithm, expected, digests[algorithm])

    staging = target / f".extracting-{archive.file}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        summary = extract_archive(local, staging, reporter)
        _merge_into(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not keep_archives:
        local.unlink()
    return ArchiveOutcome(
        file=archive.file,
        url=url,
        bytes=size,
        digests=digests,
        verified=verify,
        files_extracted=summary.files,
        skipped_members=summary.skipped,
    )


def _space_check(archive: Archive, root: Path):
    unpack_ratio = archive.approx_unpacked_bytes / archive.approx_bytes if archive.approx_bytes else 1.1

    def check(bytes_to_come: int) -> None:
        part = root / DOWNLOADS / (archive.file + ".part")
        archive_bytes = bytes_to_come + (part.stat().st_size if part.exists() else 0)
        needed = bytes_to_come + int(archive_bytes * unpack_ratio)
        available = free_bytes(root)
        if available < needed:
            raise DiskSpaceError(
                f"not enough free space under {root} for {archive.file}: need about {_gb(needed)} "
                f"({_gb(bytes_to_come)} still to download + {_gb(archive_bytes * unpack_ratio)} unpacked), "
                f"{_gb(available)} free"
            )

    return check


def _gb(count: float) -> str:
    return f"{count / 1e9:.2f} GB"


def _merge_into(staging: Path, target: Path) -> None:
    """Move each top-level entry of `staging` into `target`, replacing what a failed run left."""
    for entry in sorted(staging.iterdir()):
        destination = target / entry.name
        if destination.is_dir() and not destination.is_symlink():
            shutil.rmtree(destination)
        elif destination.exists() or destination.is_symlink():
            destination.unlink()
        os.replace(entry, destination)


def _synthesize(manifest: Manifest, root: Path, reporter: Reporter) -> DownloadResult:
    from trimodal.pipeline.sources.mini import synthesize_mini

    target = root / manifest.name
    staging = root / f".{manifest.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        details = synthesize_mini(staging, reporter=reporter)
        _write_marker(staging, {"dataset": manifest.name, "complete": True, "synthetic": True,
                                "trimodal": __version__, **details})
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return DownloadResult(manifest.name, target, already_complete=False, synthetic=True)
