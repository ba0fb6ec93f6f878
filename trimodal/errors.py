"""Exceptions for known failures; the CLI turns each into one clear line and a non-zero exit."""

from __future__ import annotations


class TrimodalError(Exception):
    """A known failure whose message tells the user what went wrong and where."""

    exit_code = 1


class ManifestError(TrimodalError):
    """A dataset manifest is missing, malformed or names an unknown dataset."""


class DownloadError(TrimodalError):
    """A transfer failed on every URL it was tried from."""


class ChecksumError(DownloadError):
    """A downloaded file does not hash to the manifest's digest."""

    def __init__(self, path: str, algorithm: str, expected: str, actual: str, origin: str = ""):
        self.path, self.algorithm, self.expected, self.actual = path, algorithm, expected, actual
        super().__init__(
            f"checksum mismatch for {path}: expected {algorithm} {expected}{origin}, got {actual}; "
            "the file was removed and nothing was extracted"
        )


class DiskSpaceError(DownloadError):
    """Not enough free space for a download and its extraction."""


class UnsafeArchiveError(TrimodalError):
    """An archive member would be written outside the target folder, or is a device file."""


class ArchiveError(TrimodalError):
    """An archive cannot be read (corrupt or truncated)."""


class DatasetLayoutError(TrimodalError):
    """A raw dataset folder lacks required files or has malformed annotation lines."""


class ShardError(TrimodalError):
    """Sharding cannot finish: too many bad samples, or an inconsistent output folder."""


class ConfigError(TrimodalError):
    """A configuration file or override is invalid."""


class StorageError(TrimodalError):
    """Object storage (or a path given as a URL) failed: no such bucket or key, access denied, unreachable."""
