"""Resumable HTTP(S) and file:// transfers: `.part` files, Range requests, retries, URL fallback."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

from trimodal import __version__
from trimodal.errors import DownloadError
from trimodal.progress import SILENT, Reporter, Task

_PERMANENT_STATUS = {400, 401, 403, 404, 405, 410, 451}
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True)
class FetchPolicy:
    attempts_per_url: int = 4
    backoff_seconds: float = 2.0  # doubled after each failed attempt
    timeout_seconds: float = 60.0
    chunk_bytes: int = 1 << 20


class _Permanent(Exception):
    """This URL will not work however often it is tried."""


class _Transient(Exception):
    """This attempt failed but another one may succeed (the `.part` file keeps what arrived)."""


SizeCheck = Callable[[int], None]


def fetch(
    urls: Sequence[str],
    destination: Path,
    *,
    reporter: Reporter = SILENT,
    policy: FetchPolicy = FetchPolicy(),
    check_size: SizeCheck | None = None,
) -> str:
    """Download the first of `urls` that works to `destination`, resuming `destination.part`.

    `check_size(bytes_still_to_come)` runs once the size is known, before the body is read; it may
    raise to stop the transfer (the free-space check). Returns the URL that delivered the file.
    """
    part = destination.with_name(destination.name + ".part")
    destination.parent.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    with reporter.task(destination.name, total=None, unit="bytes") as task:
        for url in urls:
            for attempt in range(policy.attempts_per_url):
                try:
                    _fetch_once(url, part, task, policy, check_size)
                except _Permanent as error:
                    failures.append(f"{url}: {error}")
                    break
                except _Transient as error:
                    if attempt + 1 == policy.attempts_per_url:
                        failures.append(f"{url}: {error} (after {policy.attempts_per_url} attempts)")
                        break
                    delay = policy.backoff_seconds * 2**attempt
                    reporter.note(f"{destination.name}: {error}; retrying in {delay:g} s", "warning")
                    time.sleep(delay)
                else:
                    os.replace(part, destination)
                    return url
    raise DownloadError(f"could not download {destination.name}: " + "; ".join(failures))


def _fetch_once(url: str, part: Path, task: Task, policy: FetchPolicy, check_size: SizeCheck | None) -> None:
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme == "file":
        _copy_local(url, part, task, policy, check_size)
    elif scheme in ("http", "https"):
        _fetch_http(url, part, task, policy, check_size)
    else:
        raise _Permanent(f"unsupported URL scheme {scheme!r} (use http, https or file)")


def _copy_local(url: str, part: Path, task: Task, policy: FetchPolicy, check_size: SizeCheck | None) -> None:
    source = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))
    if not source.is_file():
        raise _Permanent(f"no such file {source}")
    total = source.stat().st_size
    offset = part.stat().st_size if part.exists() else 0
    if offset > total:
        offset = 0
    if check_size:
        check_size(total - offset)
    task.update(total=total, completed=offset)
    with open(source, "rb") as reader, open(part, "r+b" if offset else "wb") as writer:
        reader.seek(offset)
        writer.seek(offset)
        writer.truncate()
        while chunk := reader.read(policy.chunk_bytes):
            writer.write(chunk)
            task.advance(len(chunk))


def _fetch_http(url: str, part: Path, task: Task, policy: FetchPolicy, check_size: SizeCheck | None) -> None:
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"trimodal/{__version__}", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=policy.timeout_seconds)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:
            # Our part may already be whole; otherwise it is longer than the file: start over.
            match = re.fullmatch(r"bytes \*/(\d+)", error.headers.get("Content-Range", ""))
            if match and int(match.group(1)) == offset:
                return
            part.unlink(missing_ok=True)
            raise _Transient("server refused the resume offset; starting over") from error
        if error.code in _PERMANENT_STATUS:
            raise _Permanent(f"HTTP {error.code} {error.reason}") from error
        raise _Transient(f"HTTP {error.code} {error.reason}") from error
    except (urllib.error.URLError, HTTPException, OSError) as error:
        reason = getattr(error, "reason", error)
        raise _Transient(f"cannot connect: {reason}") from error

    with response:
        status = response.status
        content_length = response.headers.get("Content-Length")
        remaining = int(content_length) if content_length and content_length.isdigit() else None
        if status == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != offset:
                part.unlink(missing_ok=True)
                raise _Transient("server answered the resume request with another byte range; starting over")
            mode = "ab"
        else:
            # A 200 to a Range request means the server ignored it: the body is the whole file.
            offset = 0
            mode = "wb"
        if check_size and remaining is not None:
            check_size(remaining)
        task.update(total=offset + remaining if remaining is not None else None, completed=offset)
        received = 0
        with open(part, mode) as writer:
            try:
                # read1: what has arrived (up to a chunk) goes to disk at once, so a connection cut or a
                # stop signal while the server stalls loses nothing that was received.
                while chunk := response.read1(policy.chunk_bytes):
                    writer.write(chunk)
                    received += len(chunk)
                    task.advance(len(chunk))
            except (HTTPException, OSError) as error:
                raise _Transient(f"connection broke after {offset + received} bytes ({error})") from error
        if remaining is not None and received < remaining:
            raise _Transient(f"connection closed after {offset + received} of {offset + remaining} bytes")


def hash_file(path: Path, algorithms: Sequence[str], task: Task | None = None, chunk_bytes: int = 1 << 22) -> dict[str, str]:
    """Hex digests of `path` for every algorithm, computed in one pass."""
    hashers = {name: hashlib.new(name) for name in algorithms}
    with open(path, "rb") as reader:
        while chunk := reader.read(chunk_bytes):
            for hasher in hashers.values():
                hasher.update(chunk)
            if task:
                task.advance(len(chunk))
    return {name: hasher.hexdigest() for name, hasher in hashers.items()}


def free_bytes(path: Path) -> int:
    """Free space on the file system that holds `path` (or its nearest existing parent)."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free
