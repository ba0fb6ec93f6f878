"""Safe extraction of zip and tar archives: nothing lands outside the target, `__MACOSX` is dropped.

A member with an absolute path, a `..` component, a link that points outside the target, or a device
file is refused. Callers extract into an empty staging folder and move it into place only on success,
so a refused or corrupt archive leaves nothing behind.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from trimodal.errors import ArchiveError, UnsafeArchiveError
from trimodal.progress import SILENT, Reporter, Task

_COPY_CHUNK = 1 << 20


@dataclass
class ExtractionSummary:
    files: int = 0
    directories: int = 0
    links: int = 0
    skipped: int = 0  # __MACOSX/, ._* resource forks, and members `keep` leaves out


def archive_kind(name: str) -> str:
    lowered = name.lower()
    if lowered.endswith(".zip"):
        return "zip"
    if lowered.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        return "tar"
    raise ArchiveError(f"{name}: unknown archive type (expected .zip, .tar, .tar.gz, .tgz, .tar.bz2 or .tar.xz)")


def extract_archive(archive: Path, target: Path, reporter: Reporter = SILENT,
                    keep: tuple[str, ...] = ()) -> ExtractionSummary:
    """Extract `archive` into the folder `target` (created if needed) and say what was written.

    With `keep` (fnmatch patterns of member paths) only matching members are written; the rest count
    as skipped. Every member name is still checked for safety.
    """
    target.mkdir(parents=True, exist_ok=True)
    kind = archive_kind(archive.name)
    wanted = (lambda relative: any(fnmatch.fnmatchcase(relative, pattern) for pattern in keep)) if keep else None
    try:
        if kind == "zip":
            return _extract_zip(archive, target, reporter, wanted)
        return _extract_tar(archive, target, reporter, wanted)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, ValueError) as error:
        raise ArchiveError(f"{archive}: corrupt or truncated archive ({error})") from error


def safe_member_path(name: str, archive: Path) -> str | None:
    """The member's normalised relative path, None for macOS litter; raises when it would escape."""
    unified = name.replace("\\", "/")
    if unified.startswith("/") or (len(unified) > 1 and unified[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: refusing member {name!r}: absolute path")
    parts = [part for part in unified.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive}: refusing member {name!r}: '..' would leave the target folder")
    if not parts or parts[0] == "__MACOSX" or parts[-1].startswith("._"):
        return None
    return "/".join(parts)


def _check_link(member_path: str, link_target: str, archive: Path) -> None:
    if link_target.startswith("/") or posixpath.isabs(link_target):
        raise UnsafeArchiveError(f"{archive}: refusing link {member_path!r} -> {link_target!r}: absolute target")
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(member_path), link_target))
    if resolved == ".." or resolved.startswith("../"):
        raise UnsafeArchiveError(
            f"{archive}: refusing link {member_path!r} -> {link_target!r}: it points outside the target folder"
        )


def _inside(target: Path, relative: str, archive: Path, *, follow: bool = False) -> Path:
    destination = target / relative
    # A symlink created by an earlier member must not lead outside either.
    real = os.path.realpath(destination if follow else destination.parent)
    real_target = os.path.realpath(target)
    if real != real_target and not real.startswith(real_target + os.sep):
        raise UnsafeArchiveError(f"{archive}: refusing member {relative!r}: it resolves outside the target folder")
    return destination


def _write_stream(source, destination: Path, task: Task, progress_by_output: bool) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    if destination.is_symlink() or destination.exists() and not destination.is_file():
        raise UnsafeArchiveError(f"refusing to overwrite {destination}: it is not a regular file")
    with open(destination, "wb") as writer:
        while chunk := source.read(_COPY_CHUNK):
            writer.write(chunk)
            if progress_by_output:
                task.advance(len(chunk))


def _extract_zip(archive: Path, target: Path, reporter: Reporter, wanted) -> ExtractionSummary:
    summary = ExtractionSummary()
    with zipfile.ZipFile(archive) as bundle:
        members = bundle.infolist()
        # Check every name before writing anything: the central directory gives them up front.
        planned = [(info, safe_member_path(info.filename, archive)) for info in members]
        if wanted is not None:
            planned = [(info, relative if relative is not None and wanted(relative) else None) for info, relative in planned]
        for info, relative in planned:
            if relative is not None and stat.S_ISLNK(info.external_attr >> 16):
                _check_link(relative, bundle.read(info).decode("utf-8", "replace"), archive)
        total = sum(info.file_size for info, relative in planned if relative is not None)
        with reporter.task(f"extract {archive.name}", total=total, unit="bytes") as task:
            for info, relative in planned:
                if relative is None:
                    summary.skipped += 1
                    continue
                destination = _inside(target, relative, archive)
                if info.is_dir():
                    destination.mkdir(parents=True, exist_ok=True)
                    summary.directories += 1
                elif stat.S_ISLNK(info.external_attr >> 16):
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(bundle.read(info).decode("utf-8"), destination)
                    summary.links += 1
                else:
                    with bundle.open(info) as source:
                        _write_stream(source, destination, task, progress_by_output=True)
                    summary.files += 1
    return summary


class _CountingReader:
    """Wraps the compressed archive so progress can follow bytes read from disk."""

    def __init__(self, raw, task: Task):
        self._raw, self._task = raw, task

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._task.advance(len(data))
        return data


def _extract_tar(archive: Path, target: Path, reporter: Reporter, wanted) -> ExtractionSummary:
    summary = ExtractionSummary()
    with reporter.task(f"extract {archive.name}", total=archive.stat().st_size, unit="bytes") as task:
        with open(archive, "rb") as raw, tarfile.open(fileobj=_CountingReader(raw, task), mode="r|*") as bundle:
            for member in bundle:
                relative = safe_member_path(member.name, archive)
                if relative is None or wanted is not None and not wanted(relative):
                    summary.skipped += 1
                    continue
                destination = _inside(target, relative, archive)
                if member.isdir():
                    destination.mkdir(parents=True, exist_ok=True)
                    summary.directories += 1
                elif member.isfile():
                    source = bundle.extractfile(member)
                    _write_stream(source, destination, task, progress_by_output=False)
                    os.utime(destination, (member.mtime, member.mtime))
                    summary.files += 1
                elif member.issym():
                    _check_link(relative, member.linkname, archive)
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(member.linkname, destination)
                    summary.links += 1
                elif member.islnk():
                    linked = safe_member_path(member.linkname, archive)
                    if linked is None or not _inside(target, linked, archive, follow=True).is_file():
                        raise UnsafeArchiveError(
                            f"{archive}: refusing hard link {member.name!r} -> {member.linkname!r}: "
                            "it does not point at a file extracted from this archive"
                        )
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(target / linked, destination)
                    summary.links += 1
                else:
                    raise UnsafeArchiveError(f"{archive}: refusing member {member.name!r}: device file or FIFO")
    return summary
