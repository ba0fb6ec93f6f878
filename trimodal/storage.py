"""Where data lives: a local folder, or object storage through fsspec (`s3://`, `gs://`, `memory://`).

One way for every command: `location(value)` turns what the user gave into a path object, a
`pathlib.Path` for a local path (or a `file://` URL) and a `upath.UPath` (universal_pathlib: pathlib's
API over fsspec) for a URL, so code that joins, reads and lists paths works on both.

- Credentials come from the environment and fsspec's own configuration (AWS_* variables, ~/.aws,
  GOOGLE_APPLICATION_CREDENTIALS, `fsspec.config`), never from a URL: a URL with a user or a password in
  it is refused, so that no secret reaches a config file, a log or an error message.
- `open_atomic(path)`: a reader never sees half a file. On disk a `*.tmp` file is renamed over the
  target; in object storage an object appears only when its upload completes, and a failed or stopped
  write discards the upload, so no partial object is ever under the final name.
- `storage_errors(what)`: the failures of object storage (no such bucket, no such key, access denied, a
  refused or cut connection) as one `StorageError` line naming the URL.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Union
from urllib.parse import urlsplit

from trimodal.errors import StorageError

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")

StoragePath = Union[Path, "UPath"]  # noqa: F821 - upath is imported lazily


def is_url(value: str | os.PathLike) -> bool:
    return isinstance(value, str) and bool(_URL.match(value))


def location(value: str | os.PathLike) -> StoragePath:
    """A Path for a local path or a `file://` URL; a UPath for object storage. Refuses credentials in a URL."""
    if hasattr(value, "fs") and hasattr(value, "protocol"):  # already a UPath
        if value.protocol in ("", "file", "local"):
            return Path(value.path)
        from upath import UPath

        # A new one, whose client is made in this process when first used: a UPath keeps its client, and
        # fsspec's clients do not survive a fork (a data loader worker is a fork of the trainer).
        return UPath(str(value), **value.storage_options)
    if isinstance(value, Path) or not is_url(str(value)):
        return Path(value)
    text = str(value)
    parts = urlsplit(text)
    if parts.username or parts.password:
        raise StorageError(f"{parts.scheme}://…@{parts.hostname}{parts.path}: credentials do not go in a URL; give "
                           "them in the environment or fsspec's configuration (for S3: AWS_ACCESS_KEY_ID, "
                           "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL or ~/.aws)")
    if parts.scheme in ("file", "local"):
        return Path(parts.path)
    try:
        from upath import UPath

        return UPath(text)
    except (ImportError, ValueError) as error:  # no fsspec implementation for the scheme
        raise StorageError(f"cannot open {text}: {error}") from error


def is_remote(path: StoragePath) -> bool:
    """Whether `path` is in object storage (a UPath), not on local disk."""
    return not isinstance(path, Path)


def cache_root() -> Path:
    """Where local working copies of remote things live: `$TRIMODAL_CACHE`, default `~/.cache/trimodal`."""
    return Path(os.environ.get("TRIMODAL_CACHE") or Path.home() / ".cache" / "trimodal")


def working_folder(kind: str, target: StoragePath) -> Path:
    """A local folder of this machine that belongs to the remote `target` (for files that must be local:
    a download in progress, a log a child process writes)."""
    return cache_root() / kind / hashlib.sha256(str(target).encode()).hexdigest()[:16]


def make_folder(path: StoragePath) -> None:
    """A local folder and its parents; nothing in object storage, where a folder is only a key prefix."""
    if isinstance(path, Path):
        path.mkdir(parents=True, exist_ok=True)


def listing(folder: StoragePath, pattern: str) -> list:
    """`folder.glob(pattern)` as the storage holds it now. fsspec caches a folder's listing in the client,
    so a file another process wrote since (img2dataset's shards) would be missed without a fresh one."""
    if not isinstance(folder, Path):
        folder.fs.invalidate_cache(folder.path)
    return sorted(folder.glob(pattern))


def filesystem(path: StoragePath):
    """(fsspec filesystem, its path) for an object-storage path, made in this process: fsspec's clients
    (s3fs's event loop) do not survive a fork, and a data loader worker is a fork of the trainer."""
    from fsspec.core import url_to_fs

    return url_to_fs(str(path), **getattr(path, "storage_options", {}))


def absolute(path: str | os.PathLike) -> StoragePath:
    """A local path made absolute (resolved); a URL as it is."""
    path = location(path)
    return path.resolve() if isinstance(path, Path) else path


@contextmanager
def open_atomic(path: StoragePath, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """A file to write that appears under `path` whole or not at all (see the module doc)."""
    if "w" not in mode:
        raise ValueError(f"open_atomic writes; mode {mode!r}")
    if isinstance(path, Path):
        temporary = path.with_name(path.name + ".tmp")
        try:
            with open(temporary, mode, encoding=encoding if "b" not in mode else None) as handle:
                yield handle
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        return
    with storage_errors(f"writing {path}"):
        fs, fs_path = filesystem(path)
        raw = fs.open(fs_path, "wb")
    handle = raw
    if "b" not in mode:
        import io

        handle = io.TextIOWrapper(raw, encoding=encoding or "utf-8", newline="")
    try:
        yield handle
    except BaseException:
        _discard(raw)
        raise
    with storage_errors(f"writing {path}"):
        handle.close()  # the object appears here, whole


def _discard(raw) -> None:
    """Abandon an upload in progress so that nothing appears under its name (s3fs aborts the multipart
    upload; a file system without `discard` writes only at close, which never comes)."""
    discard = getattr(raw, "discard", None)
    try:
        if discard is not None:
            discard()
        raw.closed = True  # an fsspec buffered file: close() must not commit what was written so far
    except Exception:  # noqa: S110 - the original error is the one to report
        pass


_BUCKETED = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")


def prepare_folder(path: StoragePath) -> None:
    """Make `path` ready to write into: a local folder is created; in object storage there are no
    folders, but the bucket must exist (it is never created: a mistyped name must not make a new one)."""
    if isinstance(path, Path):
        path.mkdir(parents=True, exist_ok=True)
        return
    protocol = path.protocol if isinstance(path.protocol, str) else path.protocol[0]
    with storage_errors(f"writing to {path}"):
        if protocol in _BUCKETED:
            bucket = path.fs._strip_protocol(str(path)).split("/")[0]
            if not path.fs.exists(bucket):
                raise StorageError(f"writing to {path}: the bucket {bucket} does not exist (create it first)")
        else:
            path.mkdir(parents=True, exist_ok=True)


def write_bytes(path: StoragePath, data: bytes) -> None:
    with open_atomic(path, "wb") as handle:
        handle.write(data)


def remove_tree(path: StoragePath) -> None:
    """Remove a folder and everything under it (nothing if it is not there)."""
    if isinstance(path, Path):
        shutil.rmtree(path, ignore_errors=True)
        return
    with storage_errors(f"removing {path}"):
        if path.exists():
            path.fs.rm(path.path, recursive=True)


def copy_to_local(source: StoragePath, target: Path) -> None:
    """Download one object to a local file (atomically)."""
    with storage_errors(f"reading {source}"), source.open("rb") as reader, open_atomic(target) as writer:
        shutil.copyfileobj(reader, writer, 1 << 22)


def upload(source: Path, target: StoragePath) -> None:
    """Upload one local file under `target`, the object appearing whole when the upload completes."""
    with open(source, "rb") as reader, open_atomic(target) as writer:
        shutil.copyfileobj(reader, writer, 1 << 22)


@contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """Turn the failures of object storage into one StorageError line: `what` (naming the URL) and why."""
    try:
        yield
    except StorageError:
        raise
    except PermissionError as error:
        raise StorageError(f"{what}: access denied ({_reason(error)}); check the credentials in the environment "
                           "and the bucket's policy") from error
    except FileNotFoundError as error:
        reason = _reason(error)
        if "bucket" in reason.lower():
            raise StorageError(f"{what}: the bucket does not exist ({reason})") from error
        raise StorageError(f"{what}: not found ({reason})") from error
    except Exception as error:  # botocore, aiohttp and fsspec errors, which share no base class
        name = type(error).__name__
        reason = _reason(error)
        if name in ("EndpointConnectionError", "ConnectionError", "ClientConnectorError", "ConnectTimeoutError",
                    "ServerDisconnectedError", "ReadTimeoutError", "ResponseStreamingError", "ClientPayloadError",
                    "ConnectionRefusedError", "IncompleteReadError") or isinstance(error, (ConnectionError, TimeoutError)):
            raise StorageError(f"{what}: cannot reach the storage ({reason}); retried, then gave up") from error
        if name in ("NoCredentialsError", "PartialCredentialsError", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                    "ClientError") or "credential" in reason.lower() or "access key" in reason.lower():
            raise StorageError(f"{what}: the storage refused the credentials ({reason})") from error
        if isinstance(error, OSError):
            raise StorageError(f"{what}: {reason}") from error
        raise


def _reason(error: BaseException) -> str:
    """The error's message without anything that could be a secret (signatures, keys in query strings)."""
    text = str(error) or type(error).__name__
    text = re.sub(r"(?i)(signature|x-amz-[a-z-]*|awsaccesskeyid|credential|token)=[^&\s]+", r"\1=…", text)
    return text.splitlines()[0] if text else type(error).__name__
