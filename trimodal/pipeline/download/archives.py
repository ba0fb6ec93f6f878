"""`mm download`: fetch a dataset's files, verify them, extract archives safely, mark completion last.

Plain files (not archives) are moved into the dataset folder as they are. A source with a download hook
(`register_source(..., download=fn)`) then fetches what those files point to (cc3m: the images of its
URL lists); the hook's details go into the download record, and the dataset is complete only when the
hook says so, so a rerun after an interruption resumes it.

ROOT may be in object storage (`s3://bucket/data`) for a source that reads it from there (cc3m: plain
files, and img2dataset writes the images there itself). Files are fetched into a local working folder
(`$TRIMODAL_CACHE/downloads/…`), verified there and uploaded whole; the records live in ROOT as on disk.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from trimodal import __version__
from trimodal.atomic import write_json
from trimodal.errors import ArchiveError, ChecksumError, ConfigError, DiskSpaceError, DownloadError, ManifestError
from trimodal.pipeline.download.extract import extract_archive
from trimodal.pipeline.download.fetch import FetchPolicy, fetch, free_bytes, hash_file
from trimodal.pipeline.download.manifest import Archive, Manifest
from trimodal.pipeline.download.marker import read_marker, read_state, write_marker
from trimodal.progress import SILENT, Reporter
from trimodal.storage import (StoragePath, is_remote, location, prepare_folder, remove_tree, storage_errors, upload,
                              working_folder)

DOWNLOADS = ".downloads"
# sha256 of archives that have no published checksum, taken on their first download (trust on first use).
RECORDED = ".trimodal-recorded-checksums.json"


@dataclass
class ArchiveOutcome:
    file: str
    url: str | None
    bytes: int
    digests: dict[str, str]
    verified: bool
    files_extracted: int
    skipped_members: int
    plain: bool = False  # a plain file, moved into the dataset folder as it is (nothing extracted)


@dataclass
class DownloadResult:
    name: str
    target: Path
    already_complete: bool
    archives: list[ArchiveOutcome] = field(default_factory=list)
    synthetic: bool = False
    # What the source's download hook did (its details, as recorded), for a source that has one.
    step: dict | None = None


def download(
    manifest: Manifest,
    root: Path,
    *,
    hook: Callable[..., dict] | None = None,
    hook_options: dict | None = None,
    synthesize: Callable[..., dict] | None = None,
    mirror: str | None = None,
    verify: bool = True,
    force: bool = False,
    keep_archives: bool = False,
    only: list[str] | None = None,
    reporter: Reporter = SILENT,
    policy: FetchPolicy = FetchPolicy(),
) -> DownloadResult:
    """Make `root/<manifest.name>` hold the files of `manifest` (or the parts named in `only`); what is
    complete is left alone without any request.

    `hook` is the dataset's download step (run with `hook_options` once all files are present: it decides
    what is left to do, and a complete dataset makes it return without starting anything); `synthesize`
    writes a synthetic dataset. Both come from the dataset's source (`trimodal.pipeline.datasets`).
    """
    name = manifest.name
    root = location(root)
    target = root / name
    if manifest.local:
        raise ConfigError(f"{name} is your own data: there is nothing to download "
                          f"(run `mm validate {name}` and `mm shard {name}` on its folder)")
    if is_remote(root):  # a source that reads it from there (cc3m): plain files and a hook, no unpacking
        with storage_errors(f"downloading {name} into {root}"):
            prepare_folder(root)
    given = dict(hook_options or {})
    wanted = _wanted_archives(manifest, only)
    complete = None
    if force and not only:
        remove_tree(target)
    elif not force:
        complete = read_marker(root, name)
        if complete and hook is None:
            return DownloadResult(name, target, already_complete=True, synthetic=manifest.synthetic)

    if manifest.synthetic:
        return _synthesize(manifest, root, reporter, synthesize)

    state = read_state(target)
    if not complete and (state.get("dataset") not in (None, name) or state.get("verified", verify) != verify):
        state = {}
    if not force and only and hook is None and all(archive.file in state.get("archives", {}) for archive in wanted):
        return DownloadResult(name, target, already_complete=True)
    prepare_folder(target)
    state.update({"dataset": name, "trimodal": __version__})
    state.setdefault("verified", verify)  # a complete download's files stay as verified as they were
    state.setdefault("archives", {})
    has_step = hook is not None
    if force:  # with --only: those parts again, the others kept; the record stops claiming them first
        for archive in wanted:
            state["archives"].pop(archive.file, None)
        write_marker(target, _with_progress(state, manifest, has_step))
    outcomes = []
    fetched = False
    for archive in wanted:
        recorded = state["archives"].get(archive.file)
        if recorded:
            outcomes.append(ArchiveOutcome(**recorded))
            continue
        outcome = _download_archive(archive, root, target, mirror, verify, keep_archives, reporter, policy)
        state["archives"][archive.file] = outcome.__dict__
        fetched = True
        # Parts are recorded as they finish, so a run that fails later still reports what it has.
        write_marker(target, _with_progress(state, manifest, has_step))
        outcomes.append(outcome)
    write_marker(target, _with_progress(state, manifest, has_step))
    downloads = _downloads(root)
    if downloads.is_dir() and not any(downloads.iterdir()):
        downloads.rmdir()
    if hook is None or not all(archive.file in state["archives"] for archive in manifest.archives):
        return DownloadResult(name, target, already_complete=False, archives=outcomes)
    step = _run_step(hook, state, manifest, target, given, reporter)
    return DownloadResult(name, target, already_complete=not fetched and not step.get("ran", True),
                          archives=outcomes, step=step)


def _downloads(root: StoragePath) -> Path:
    """Where files are fetched to before they are verified and placed: ROOT/.downloads, or a local
    working folder for a ROOT in object storage (resumable `.part` files need a local file)."""
    return working_folder("downloads", root) if is_remote(root) else root / DOWNLOADS


def _run_step(hook, state: dict, manifest: Manifest, target: StoragePath, given: dict, reporter: Reporter) -> dict:
    """Run the download hook and record what it did; the record says complete only once the hook does.

    Its details update the earlier ones, so a run that had nothing to do keeps the last run's figures.
    """
    before = json.loads(json.dumps(state))
    step = state.setdefault("download_step", {})
    step.pop("problem", None)
    step.update({"complete": False, "options": given})
    write_marker(target, _with_progress(state, manifest, True))
    try:
        details = hook(target, reporter=reporter, **given)
    except ConfigError:  # refused before doing anything: the record stays what it was
        write_marker(target, before)
        raise
    step.update(details)
    write_marker(target, _with_progress(state, manifest, True))
    if not step.get("complete"):
        raise DownloadError(step.get("problem") or f"{manifest.name}: the download step did not finish; "
                                                   "run the same command again to continue")
    return step


def _with_progress(state: dict, manifest: Manifest, has_step: bool = False) -> dict:
    """`state` with `complete` (every archive present, and the download hook's step done when there is one)
    and `parts` (parts whose archives all are) brought up to date."""
    present = state["archives"]
    state["complete"] = (all(archive.file in present for archive in manifest.archives)
                         and (not has_step or state.get("download_step", {}).get("complete") is True))
    state["parts"] = [part for part in manifest.parts()
                      if all(a.file in present for a in manifest.archives if a.part == part)]
    return state


def _wanted_archives(manifest: Manifest, only: list[str] | None) -> list[Archive]:
    if not only:
        return list(manifest.archives)
    parts = manifest.parts()
    if not parts:
        raise ConfigError(f"{manifest.name} is not split into parts: --only does not apply to it")
    unknown = [part for part in only if part not in parts]
    if unknown:
        raise ConfigError(f"{manifest.name} has no part {', '.join(map(repr, unknown))}; its parts: {', '.join(parts)}")
    return [archive for archive in manifest.archives if archive.part in only]


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
    local = _downloads(root) / archive.file
    url = None
    if not local.is_file():
        urls = [mirror.rstrip("/") + "/" + archive.file] if mirror else _resolved(archive.urls)
        url = fetch(urls, local, reporter=reporter, policy=policy, check_size=_space_check(archive, local.parent))
    size = local.stat().st_size

    digests: dict[str, str] = {}
    vouched_for = False  # hashed to a digest known before this download
    recorded = None
    if verify:
        expected_digests = dict(archive.digests)
        recorded = _recorded_checksums(root).get(archive.file) if archive.unpublished_checksum else None
        if archive.unpublished_checksum:
            expected_digests = {"sha256": recorded} if recorded else {}
        with reporter.task(f"verify {archive.file}", total=size, unit="bytes") as task:
            digests = hash_file(local, list(expected_digests) or ["sha256"], task)
        for algorithm, expected in expected_digests.items():
            if digests[algorithm] != expected:
                local.unlink()
                raise ChecksumError(str(local), algorithm, expected, digests[algorithm],
                                    "" if archive.digests else f" (the digest recorded in {root / RECORDED} on its first download)")
        vouched_for = bool(expected_digests)

    if not archive.is_archive:
        return _place_plain_file(archive, root, target, local, url, size, digests, verify, recorded, reporter)
    staging = target / f".extracting-{archive.file}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        summary = extract_archive(local, staging, reporter, keep=archive.keep)
        _merge_into(staging, target)
    except ArchiveError:
        if not vouched_for:  # likely a broken transfer (an error page, a cut file): fetch it again next time
            local.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    # Trust on first use only once the archive has proved to unpack: a broken first transfer must not
    # become the digest every later download is held to.
    if verify and archive.unpublished_checksum and not recorded:
        _trust_on_first_use(root, archive.file, digests["sha256"], reporter)
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


def _resolved(urls: tuple[str, ...]) -> list[str]:
    """`urls` with each `osf://PROJECT/FOLDER/FILE` replaced by its download link (OSF's API is asked only
    when a download starts); one that cannot be resolved is left out, unless none is left."""
    from trimodal.pipeline.download import osf

    resolved, failures = [], []
    for url in urls:
        try:
            resolved.append(osf.resolve(url, api=osf.API) if osf.is_osf(url) else url)
        except DownloadError as error:
            failures.append(str(error))
    if not resolved:
        raise DownloadError("; ".join(failures))
    return resolved


def _place_plain_file(archive: Archive, root: Path, target: Path, local: Path, url: str | None, size: int,
                      digests: dict[str, str], verify: bool, recorded: str | None,
                      reporter: Reporter) -> ArchiveOutcome:
    """Move a verified plain file into `target` as it is (a rename within ROOT: no second copy, so
    `--keep-archives` has nothing to keep)."""
    destination = target / archive.file
    if is_remote(destination):
        upload(local, destination)  # the object appears whole, or not at all
        local.unlink()
    else:
        if destination.is_dir() and not destination.is_symlink():
            shutil.rmtree(destination)
        shutil.move(local, destination)
    # No unpacking proves a plain file whole; fetch() has checked its length against Content-Length,
    # and a source hook that reads it (cc3m's TSV parser) names a file that is not what it should be.
    if verify and archive.unpublished_checksum and not recorded:
        _trust_on_first_use(root, archive.file, digests["sha256"], reporter)
    return ArchiveOutcome(file=archive.file, url=url, bytes=size, digests=digests, verified=verify,
                          files_extracted=0, skipped_members=0, plain=True)


def _trust_on_first_use(root: Path, file: str, sha256: str, reporter: Reporter) -> None:
    _record_checksum(root, file, sha256)
    reporter.note(f"{file} has no published checksum: its sha256 {sha256} is recorded in "
                  f"{root / RECORDED} and every later download of it must match", "warning")


def _recorded_checksums(root: Path) -> dict[str, str]:
    try:
        return json.loads((root / RECORDED).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _record_checksum(root: Path, file: str, sha256: str) -> None:
    write_json(root / RECORDED, {**_recorded_checksums(root), file: sha256}, sort_keys=True)


def _space_check(archive: Archive, downloads: Path):
    if not archive.is_archive:  # moved, not unpacked: it needs its own bytes only
        unpack_ratio = 0.0
    else:
        unpack_ratio = archive.approx_unpacked_bytes / archive.approx_bytes if archive.approx_bytes else 1.1

    def check(bytes_to_come: int) -> None:
        part = downloads / (archive.file + ".part")
        archive_bytes = bytes_to_come + (part.stat().st_size if part.exists() else 0)
        needed = bytes_to_come + int(archive_bytes * unpack_ratio)
        available = free_bytes(downloads.parent)
        if available < needed:
            unpacked = f" + {_gb(archive_bytes * unpack_ratio)} unpacked" if unpack_ratio else ""
            raise DiskSpaceError(
                f"not enough free space under {downloads.parent} for {archive.file}: need about {_gb(needed)} "
                f"({_gb(bytes_to_come)} still to download{unpacked}), {_gb(available)} free"
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


def _synthesize(manifest: Manifest, root: Path, reporter: Reporter, synthesize) -> DownloadResult:
    if synthesize is None:
        raise ManifestError(f"{manifest.path}: synthetic, but the {manifest.name} source registers no synthesizer")
    target = root / manifest.name
    staging = root / f".{manifest.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        details = synthesize(staging, reporter=reporter)
        write_marker(staging, {"dataset": manifest.name, "complete": True, "synthetic": True,
                                "trimodal": __version__, **details})
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return DownloadResult(manifest.name, target, already_complete=False, synthetic=True)
