"""SIGTERM to `mm download`, `mm shard` and `mm featurize` (a SLURM preemption, a spot machine going away).

Each command is stopped for real in the middle of its work, while it waits on a read that the test holds
open (a stalled HTTP answer, a named pipe in place of an input file), so the signal cannot arrive before
or after the work. It must end with one line and the exit status 128 + 15, leave nothing half-written
that looks complete, and a rerun must finish to exactly what an uninterrupted run writes.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.builders import build_archives, build_flickr_tree, manifest_expecting
from trimodal.features.store import FeatureStore
from trimodal.pipeline import datasets as datasets_module
from trimodal.pipeline.download.marker import read_marker

STOPPED = 128 + signal.SIGTERM


def sigterm_when(ready, timeout: float = 60) -> threading.Thread:
    """Send this process SIGTERM once `ready()` is true (from a thread: Python runs the handler in the main
    thread, wherever it is waiting)."""

    def send() -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


class HeldPipe:
    """A named pipe in place of `path`: a reader that opens it waits until `release()`. `opened` is set
    once the reader is inside (the writer's open returns only then)."""

    def __init__(self, path: Path):
        self.path, self.real = path, path.read_bytes()
        self.opened = threading.Event()
        path.unlink()
        os.mkfifo(path)
        self._fd: int | None = None
        self._thread = threading.Thread(target=self._hold, daemon=True)
        self._thread.start()

    def _hold(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY)  # blocks until the command opens it to read
        self.opened.set()

    def restore(self) -> None:
        """The real file back in place; the reader that waited sees an end of file. (Had nobody opened the
        pipe, our daemon thread stays blocked on it, which harms nothing.)"""
        self.path.unlink()
        self.path.write_bytes(self.real)
        if self._fd is not None:
            os.close(self._fd)


def tree(root: Path, *, leave_out: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every file under `root` (but those named in `leave_out`) and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in leave_out and not set(p.relative_to(root).parts) & set(leave_out)}


def one_line(result) -> str:
    """The stop line: the last thing printed, the only line about the signal, no traceback (progress lines of
    work that finished may come before it; nothing cut short says it is done)."""
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert "Traceback" not in result.output
    assert [line for line in lines if "SIGTERM" in line] == lines[-1:], result.output
    return lines[-1]


# --- mm download ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def facc_archives(tmp_path_factory):
    return build_archives(build_flickr_tree(tmp_path_factory.mktemp("stop-source"), train=6, val=2, test=2))


def test_sigterm_mid_transfer_keeps_the_part_file_and_a_rerun_completes_identically(http_server, facc_archives, mm,
                                                                                   tmp_path, monkeypatch):
    for file, data in facc_archives.items():
        http_server.files[f"/{file}"] = data
    monkeypatch.setattr(datasets_module, "load_manifest", lambda name: manifest_expecting(name, facc_archives))
    assert mm("download", "facc", "--root", tmp_path / "whole", "--mirror", http_server.url).exit_code == 0

    http_server.rules["/flickr_audio.tar.gz"] = {"stall_once": True}
    size = len(facc_archives["flickr_audio.tar.gz"])
    # The signal comes while the server holds the second half back, once the first half is on disk.
    sigterm_when(lambda: any(p.stat().st_size == size // 2 for p in (tmp_path / "cut").rglob("*.part")))
    stopped = mm("download", "facc", "--root", tmp_path / "cut", "--mirror", http_server.url)
    http_server.release.set()
    assert stopped.exit_code == STOPPED
    assert "stopped by SIGTERM" in one_line(stopped) and "same command" in one_line(stopped)
    assert "flickr_audio.tar.gz: done" not in stopped.err
    assert not read_marker(tmp_path / "cut", "facc")  # not complete, and nothing says it is
    assert not (tmp_path / "cut" / "facc" / "flickr_audio").exists()
    parts = list((tmp_path / "cut").rglob("*.part"))
    assert [p.stat().st_size for p in parts] == [size // 2]  # the bytes that arrived are kept

    assert mm("download", "facc", "--root", tmp_path / "cut", "--mirror", http_server.url).exit_code == 0
    assert http_server.requests_for("/flickr_audio.tar.gz")[-1].range == f"bytes={size // 2}-"
    marker = "marker.json"
    assert tree(tmp_path / "cut", leave_out=(marker,)) == tree(tmp_path / "whole", leave_out=(marker,))
    assert read_marker(tmp_path / "cut", "facc")["complete"] is True


# --- mm shard ------------------------------------------------------------------------------------------


def test_sigterm_mid_shard_leaves_no_index_and_a_rerun_writes_the_same_shards(mini_copy, mm, tmp_path):
    assert mm("shard", "mini", "--root", mini_copy, "--out", tmp_path / "whole").exit_code == 0
    images = sorted((mini_copy / "mini").rglob("*.png")) + sorted((mini_copy / "mini").rglob("*.jpg"))
    held = HeldPipe(images[len(images) * 3 // 4])
    out = tmp_path / "shards"
    sigterm_when(held.opened.is_set)
    stopped = mm("shard", "mini", "--root", mini_copy, "--out", out, "--workers", "1")
    held.restore()
    assert stopped.exit_code == STOPPED, stopped.output
    assert "stopped by SIGTERM" in one_line(stopped)
    assert not (out / "index.json").exists()  # the mark of a complete set of shards
    assert not list(out.glob("*.tmp"))
    finished = sorted(p.name for p in out.glob("*.tar"))
    assert finished, "the signal came before any shard was written: the test proves nothing"

    assert mm("shard", "mini", "--root", mini_copy, "--out", out).exit_code == 0
    # The shards and their index; the sidecars (resume bookkeeping) hold the times of the input files, one
    # of which the test replaced.
    assert tree(out, leave_out=(".shards",)) == tree(tmp_path / "whole", leave_out=(".shards",))


# --- mm featurize --------------------------------------------------------------------------------------


def test_sigterm_mid_featurize_keeps_finished_shards_and_a_rerun_gives_the_same_store(mini_shards, mini_features, mm,
                                                                                     tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(mini_shards, shards)
    names = sorted(p.name for p in shards.glob("*.tar"))
    held = HeldPipe(shards / names[-1])  # the reader thread waits here while earlier shards are computed
    store = tmp_path / "features.zarr"
    sigterm_when(held.opened.is_set)
    stopped = mm("featurize", shards, "--out", store, "--device", "cpu")
    held.restore()
    assert stopped.exit_code == STOPPED, stopped.output
    assert "stopped by SIGTERM" in one_line(stopped)
    partial = FeatureStore.open(store)
    assert not partial.complete()
    done = [slot.name for slot in partial.slots.values() if slot.done]
    assert names[-1] not in done

    assert mm("featurize", shards, "--out", store, "--device", "cpu").exit_code == 0
    resumed, whole = FeatureStore.open(store), FeatureStore.open(mini_features)
    assert resumed.complete()
    for name in names:
        a, b = resumed.read_shard(name), whole.read_shard(name)
        assert a.keys == b.keys
        for field in ("image", "mel", "frame_offsets", "tokens"):
            assert np.array_equal(getattr(a, field), getattr(b, field)), (name, field)
