"""Dataset manifests (`manifests/*.toml`): where each file lives, what it hashes to, what it holds.

Each `[[archives]]` entry is one downloaded file. An archive (.zip, .tar, .tar.gz, .tgz, .tar.bz2,
.tar.xz) is extracted into the dataset folder; any other file (a TSV of URLs, a JSON list, an .npy
array) is a plain file, moved there as it is.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from trimodal.errors import ArchiveError, ManifestError
from trimodal.pipeline.download.extract import archive_kind

_HEX_LENGTHS = {"md5": 32, "sha256": 64}


@dataclass(frozen=True)
class Archive:
    file: str
    urls: tuple[str, ...]
    md5: str | None = None
    sha256: str | None = None
    approx_bytes: int = 0
    approx_unpacked_bytes: int = 0
    unpacks_to: tuple[str, ...] = ()
    part: str | None = None  # what `mm download NAME --only PART` fetches: "annotations", "val", …
    keep: tuple[str, ...] = ()  # member paths (fnmatch patterns) to extract; empty = all of them
    # No published digest: the sha256 of the first complete download is recorded and checked on every
    # later use of the file (trust on first use), and the download says so.
    unpublished_checksum: bool = False

    @property
    def is_archive(self) -> bool:
        """False for a plain file, which is verified and moved into the dataset folder without unpacking."""
        return is_archive_name(self.file)

    @property
    def digests(self) -> dict[str, str]:
        """Published digests by algorithm name, strongest first."""
        return {name: value for name, value in (("sha256", self.sha256), ("md5", self.md5)) if value}


@dataclass(frozen=True)
class Manifest:
    name: str
    title: str
    licence: str
    terms_url: str
    modalities: tuple[str, ...] = ()
    archives: tuple[Archive, ...] = ()
    counts: dict[str, int] = field(default_factory=dict)
    synthetic: bool = False
    local: bool = False  # the user's own data: nothing to download
    joins: str | None = None
    citation: str = ""
    path: Path | None = None

    def parts(self) -> list[str]:
        """The parts `--only` can name, in manifest order."""
        return list(dict.fromkeys(archive.part for archive in self.archives if archive.part))


def is_archive_name(file: str) -> bool:
    try:
        archive_kind(file)
    except ArchiveError:
        return False
    return True


def manifest_dir() -> Path:
    """The folder holding the manifests: inside the installed wheel, or at the repository root."""
    package = Path(__file__).resolve().parents[2]  # trimodal/
    for candidate in (package / "manifests", package.parent / "manifests"):
        if candidate.is_dir():
            return candidate
    raise ManifestError(f"no manifests folder found next to {package}")


def available() -> list[str]:
    return sorted(path.stem for path in manifest_dir().glob("*.toml"))


def load_manifest(name: str) -> Manifest:
    path = manifest_dir() / f"{name}.toml"
    if not path.is_file():
        raise ManifestError(f"unknown dataset {name!r}; known datasets: {', '.join(available())}")
    return parse_manifest(path)


def parse_manifest(path: Path) -> Manifest:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ManifestError(f"{path}: cannot read manifest: {error}") from error

    problems: list[str] = []
    local = bool(raw.get("local", False))
    for key in ("name", "title", "licence") + (() if local else ("terms_url",)):
        if not isinstance(raw.get(key), str) or not raw[key]:
            problems.append(f"missing or empty '{key}'")
    archives = []
    for number, entry in enumerate(raw.get("archives", []), start=1):
        archive, archive_problems = _parse_archive(entry)
        problems += [f"archive {number}: {problem}" for problem in archive_problems]
        if archive is not None:
            archives.append(archive)
    if not archives and not raw.get("synthetic", False) and not local:
        problems.append("no [[archives]] and neither synthetic nor local")
    if archives and any(archive.part for archive in archives) and not all(archive.part for archive in archives):
        problems.append("either every archive names its 'part' or none does")
    counts = raw.get("counts", {})
    if not all(isinstance(value, int) for value in counts.values()):
        problems.append("[counts] values must be integers")
    if problems:
        raise ManifestError(f"{path}: " + "; ".join(problems))

    return Manifest(
        name=raw["name"],
        title=raw["title"],
        licence=raw["licence"],
        terms_url=raw.get("terms_url", ""),
        modalities=tuple(raw.get("modalities", ())),
        archives=tuple(archives),
        counts=dict(counts),
        synthetic=bool(raw.get("synthetic", False)),
        local=local,
        joins=raw.get("joins"),
        citation=raw.get("citation", ""),
        path=path,
    )


def _parse_archive(entry: dict) -> tuple[Archive | None, list[str]]:
    problems = []
    file = entry.get("file")
    urls = entry.get("urls")
    if not isinstance(file, str) or not file or "/" in file:
        problems.append(f"bad 'file' {file!r}")
    if not isinstance(urls, list) or not urls or not all(isinstance(url, str) for url in urls):
        problems.append("'urls' must be a non-empty list of strings")
    for algorithm, length in _HEX_LENGTHS.items():
        value = entry.get(algorithm)
        if value is not None and (len(value) != length or any(c not in "0123456789abcdef" for c in value)):
            problems.append(f"{algorithm} {value!r} is not {length} lower-case hex digits")
    unpublished = entry.get("checksum") == "unpublished"
    if entry.get("checksum") not in (None, "unpublished"):
        problems.append(f"checksum = {entry['checksum']!r}: the only value is \"unpublished\"")
    if not entry.get("md5") and not entry.get("sha256") and not unpublished:
        problems.append('no md5 or sha256 (write checksum = "unpublished" when none is published)')
    keep = entry.get("keep", [])
    if not isinstance(keep, list) or not all(isinstance(pattern, str) and pattern for pattern in keep):
        problems.append("'keep' must be a list of member path patterns")
    elif keep and isinstance(file, str) and not is_archive_name(file):
        problems.append(f"'keep' picks members of an archive, but {file} is a plain file (kept whole)")
    if problems:
        return None, problems
    return (
        Archive(
            file=file,
            urls=tuple(urls),
            md5=entry.get("md5"),
            sha256=entry.get("sha256"),
            approx_bytes=int(entry.get("approx_bytes", 0)),
            approx_unpacked_bytes=int(entry.get("approx_unpacked_bytes", 0)),
            unpacks_to=tuple(entry.get("unpacks_to", ())),
            part=entry.get("part"),
            keep=tuple(keep),
            unpublished_checksum=unpublished,
        ),
        [],
    )
