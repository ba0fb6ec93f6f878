"""S3 on 127.0.0.1 for the object-storage tests: moto's server (its `moto[server]` package), s3fs as the
client, credentials only in the environment, and a TCP proxy that cuts connections on purpose."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

import pytest

SECRET = "s3cr3t-that-must-never-be-written-anywhere"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto's server exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto's server did not start")


@dataclass
class MotoServer:
    url: str
    process: subprocess.Popen


def start_moto(env: dict | None = None) -> MotoServer:
    pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install 'moto[server]')")
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    _wait_for_port(port, process)
    return MotoServer(f"http://127.0.0.1:{port}", process)


@pytest.fixture(scope="session")
def moto_server():
    server = start_moto()
    yield server
    server.process.terminate()
    server.process.wait(10)


def forget_clients() -> None:
    """fsspec keeps one S3 client per set of options: a test that changes the endpoint or the keys in the
    environment must not get the previous one."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_env(monkeypatch):
    """Set the S3 environment (endpoint, keys, region, few retries) and forget cached clients."""

    def apply(endpoint: str, key: str = "trimodal-test", secret: str = SECRET) -> None:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
        monkeypatch.delenv("AWS_PROFILE", raising=False)
        forget_clients()

    yield apply
    forget_clients()


@pytest.fixture
def bucket(moto_server, s3_env) -> str:
    """A new, empty bucket on the moto server, the environment pointed at it."""
    import fsspec

    s3_env(moto_server.url)
    name = f"trimodal-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3").mkdir(name)
    return name


@dataclass
class CuttingProxy:
    """Forwards 127.0.0.1:port to `upstream`; `cuts` connections are closed after `after` bytes of answer."""

    upstream: tuple[str, int]
    after: int
    cuts: int = 0
    port: int = 0
    done: int = 0
    _server: socket.socket | None = None
    _threads: list = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "CuttingProxy":
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def close(self) -> None:
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, answers: bool) -> None:
        sent = 0
        try:
            while data := source.recv(65536):
                if answers and self.done < self.cuts and sent + len(data) > self.after:
                    self.done += 1
                    sink.sendall(data[: max(0, self.after - sent)])
                    raise ConnectionResetError("cut by the test proxy")
                sink.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                end.close()
