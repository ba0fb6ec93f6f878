"""Shared fixtures: a loopback HTTP server with scriptable misbehaviour, the mini dataset, CLI runner."""

from __future__ import annotations

import re
import shutil
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.builders import serving
from trimodal.cli.main import main
from trimodal.pipeline.datasets import download_dataset


@dataclass
class Request:
    path: str
    range: str | None
    status: int


@dataclass
class ArchiveServer:
    """Serves `files` on 127.0.0.1. `rules[path]` scripts misbehaviour:
    cut_once (send half the body, then hang up, once), ignore_range, redirect (to another path),
    fail (list of statuses answered before serving the file), stall_once (send half the body, set
    `stalled`, and wait for `release`, once)."""

    files: dict[str, bytes] = field(default_factory=dict)
    rules: dict[str, dict] = field(default_factory=dict)
    log: list[Request] = field(default_factory=list)
    port: int = 0
    stalled: threading.Event = field(default_factory=threading.Event)  # stall_once: half sent, waiting
    release: threading.Event = field(default_factory=threading.Event)  # ends a stall_once answer

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests_for(self, path: str) -> list[Request]:
        return [r for r in self.log if r.path == path]


def _handler(server: ArchiveServer):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output clean
            pass

        def do_GET(self):
            rule = server.rules.get(self.path, {})
            requested = self.headers.get("Range")
            if "redirect" in rule:
                return self._answer(302, headers={"Location": rule["redirect"]})
            if rule.get("fail"):
                return self._answer(rule["fail"].pop(0))
            if self.path not in server.files:
                return self._answer(404)
            data = server.files[self.path]
            match = re.fullmatch(r"bytes=(\d+)-", requested or "")
            if match and not rule.get("ignore_range"):
                start = int(match.group(1))
                if start >= len(data):
                    return self._answer(416, headers={"Content-Range": f"bytes */{len(data)}"})
                headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
                status, body = 206, data[start:]
            else:
                status, body, headers = 200, data, {}
            headers["Content-Length"] = str(len(body))
            if rule.get("cut_once"):
                rule["cut_once"] = False
                body = body[: len(body) // 2]
            if rule.get("stall_once"):
                rule["stall_once"] = False
                self._answer(status, body[: len(body) // 2], headers)
                server.stalled.set()
                server.release.wait(60)
                return
            self._answer(status, body, headers)

        def _answer(self, status, body=b"", headers=None):
            server.log.append(Request(self.path, self.headers.get("Range"), status))
            self.send_response(status)
            for key, value in (headers or {"Content-Length": str(len(body))}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
            self.close_connection = True

    return Handler


@pytest.fixture
def http_server():
    server = ArchiveServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(server))
    server.port = httpd.server_address[1]
    with serving(httpd):
        try:
            yield server
        finally:
            server.release.set()  # a stalled answer ends before the server shuts down


def _synthesized(name: str, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp(f"{name}-data")
    download_dataset(name, root)
    return root


def _sharded(name: str, root: Path, tmp_path_factory) -> Path:
    from trimodal.pipeline.shard.writer import ShardOptions
    from trimodal.pipeline.datasets import shard_dataset

    out = tmp_path_factory.mktemp(f"{name}-shards") / name
    shard_dataset(name, root, out, ShardOptions(workers=2))
    return out


@pytest.fixture(scope="session")
def mini_root(tmp_path_factory) -> Path:
    """The mini dataset, synthesised once per test session (treat as read-only)."""
    return _synthesized("mini", tmp_path_factory)


@pytest.fixture(scope="session")
def mini_coco_root(tmp_path_factory) -> Path:
    """mini-coco (the mini shapes in the coco2014 + SpokenCOCO layout), synthesised once (read-only)."""
    return _synthesized("mini-coco", tmp_path_factory)


@pytest.fixture(scope="session")
def mini_coco_shards(mini_coco_root, tmp_path_factory) -> Path:
    """mini-coco sharded with the defaults (read-only)."""
    return _sharded("mini-coco", mini_coco_root, tmp_path_factory)


@pytest.fixture
def mini_copy(mini_root, tmp_path) -> Path:
    """A private, writable copy of the mini dataset root."""
    shutil.copytree(mini_root, tmp_path / "data", symlinks=True)
    return tmp_path / "data"


@dataclass
class CliResult:
    exit_code: int
    out: str
    err: str

    @property
    def output(self) -> str:
        return self.out + self.err


@pytest.fixture
def mm(capsys):
    """Run `mm ARGS…` in-process, exactly as the console script does, and capture what it prints."""

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def mini_shards(mini_root, tmp_path_factory) -> Path:
    """The mini dataset sharded with the defaults (read-only)."""
    return _sharded("mini", mini_root, tmp_path_factory)


def featurizer(shards: Path, tmp_path_factory, name: str):
    """A factory: `shards` featurized on the CPU with extra `mm featurize` options (a config's `# featurize:`
    line), once per distinct set of options (random-init towers: pretrained weight tags are dropped)."""
    from trimodal.cli.main import main

    stores = {}

    def store(options=()) -> Path:
        key = tuple(random_weights(list(options)))
        if key not in stores:
            out = tmp_path_factory.mktemp(f"{name}-features") / "store.zarr"
            assert main(["featurize", str(shards), "--out", str(out), "--device", "cpu", *key]) == 0, key
            stores[key] = out
        return stores[key]

    return store


def random_weights(options: list[str]) -> list[str]:
    """Featurize options with pretrained weights (`open_clip:ViT-B-32:openai:layer=10`,
    `torchaudio:HUBERT_BASE:pretrained`) made random-init towers: no download in tests."""
    return [re.sub(r"^(open_clip|timm|torchaudio):([^:]+):(?!layer=)[^:]+", r"\1:\2", option) for option in options]


@pytest.fixture(scope="session")
def featurized_mini(mini_shards, tmp_path_factory):
    """`featurizer` over the mini shards (read-only stores)."""
    return featurizer(mini_shards, tmp_path_factory, "mini")


@pytest.fixture(scope="session")
def mini_features(featurized_mini) -> Path:
    """The mini shards featurized with the defaults: random-init open_clip ViT-B-32, mel80, tokens."""
    return featurized_mini()


@pytest.fixture(scope="session")
def mini_cman_features(featurized_mini) -> Path:
    """The mini shards featurized as configs/cman-tiny.toml's `# featurize:` line asks (random-init towers)."""
    from trimodal.training.config import featurize_line, shipped_config

    return featurized_mini(featurize_line(shipped_config("cman-tiny")))


@pytest.fixture(scope="session")
def micro_shards(mini_root, tmp_path_factory) -> Path:
    """A few mini samples (8 train, 4 val, 4 test, with their speech) sharded through a custom JSONL
    manifest: enough for one training step of any config, small enough for full-size towers on a CPU."""
    import json

    from trimodal.pipeline.shard.writer import ShardOptions
    from trimodal.pipeline.datasets import shard_dataset
    from trimodal.pipeline.sources import scan_source

    base = tmp_path_factory.mktemp("micro")
    wanted = {"train": 8, "val": 4, "test": 4}
    rows = []
    for sample in scan_source("mini", mini_root).samples:
        if wanted.get(sample.split, 0) > 0:
            wanted[sample.split] -= 1
            rows.append({"key": sample.key, "image": str(sample.image), "split": sample.split,
                         "captions": [c.text for c in sample.captions], "audio": [c.audio for c in sample.captions]})
    manifest = base / "micro.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    shard_dataset("custom", None, base / "shards", ShardOptions(workers=1), source_options={"manifest": manifest})
    return base / "shards"


@pytest.fixture(scope="session")
def featurized_micro(micro_shards, tmp_path_factory):
    """`featurizer` over the micro shards."""
    return featurizer(micro_shards, tmp_path_factory, "micro")


@pytest.fixture(scope="session")
def babylm_sources(tmp_path_factory) -> tuple[Path, Path]:
    """(shards, store) of a generated BabyLM-format set: 900 templated captions with 768-d vectors that sum
    one random direction per attribute (noise 0.5), 5% val and 5% test, the vectors imported (read-only)."""
    from trimodal.features.featurize import FeaturizeOptions, featurize
    from trimodal.pipeline.shard.writer import ShardOptions
    from trimodal.pipeline.datasets import shard_dataset
    from trimodal.pipeline.synthesize.babylm import write_babylm

    base = tmp_path_factory.mktemp("babylm")
    write_babylm(base / "data" / "babylm-mm", cc3m=900, noise=0.5)
    shard_dataset("babylm-mm", base / "data", base / "shards", ShardOptions(max_samples=200),
                  source_options={"val_fraction": 0.05, "test_fraction": 0.05})
    featurize(base / "shards", base / "f.zarr", FeaturizeOptions(device="cpu", audio=None))
    return base / "shards", base / "f.zarr"
