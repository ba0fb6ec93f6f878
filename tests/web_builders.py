"""A loopback web of images for URL datasets (CC3M): some URLs work, some 404, some serve a page that is not
an image, some answer slowly; and the GCC TSVs that list them, in the real `caption<TAB>url` format."""

from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.builders import make_jpeg, serving

NOT_AN_IMAGE = b"<html><body>This photo is no longer available</body></html>"


@dataclass
class ImageServer:
    """Serves `files` on 127.0.0.1; a path in `delays` answers after that many seconds; others are 404."""

    files: dict[str, bytes] = field(default_factory=dict)
    delays: dict[str, float] = field(default_factory=dict)
    requests: Counter = field(default_factory=Counter)  # path -> GET count
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _handler(server: ImageServer):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            server.requests[self.path] += 1
            time.sleep(server.delays.get(self.path, 0))
            body = server.files.get(self.path)
            try:
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")
            except OSError:  # the client gave up waiting (a timeout under test)
                pass
            self.close_connection = True

    return Handler


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # img2dataset opens dozens of connections at once; the default backlog is 5


@contextmanager
def serve_images():
    server = ImageServer()
    httpd = _Server(("127.0.0.1", 0), _handler(server))
    server.port = httpd.server_address[1]
    with serving(httpd):
        yield server


@dataclass
class UrlWorld:
    """What one split's TSV lists, by what its URLs do: `ok` serve a JPEG, `missing` are 404, `not_image`
    serve an HTML page, `slow` answer after `slow_seconds`."""

    lines: list[tuple[str, str]]  # (caption, url) in TSV order
    ok: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    not_image: list[str] = field(default_factory=list)
    slow: list[str] = field(default_factory=list)

    @property
    def tsv(self) -> bytes:
        return "".join(f"{caption}\t{url}\n" for caption, url in self.lines).encode("utf-8")


def build_url_world(server: ImageServer, split: str, kinds: str, *, slow_seconds: float = 3.0, seed: int = 0,
                    image_size: tuple[int, int] | None = None) -> UrlWorld:
    """A split whose row i behaves as `kinds[i]`: o = image, m = missing (404), n = not an image, s = slow.

    Images are `image_size` noise JPEGs (default: small, each of another width). Captions look like
    CC3M's (lower-cased, tokenized, a hypernym for names), one with a `"` in it."""
    world = UrlWorld([])
    for row, kind in enumerate(kinds):
        path = f"/{split}/{row:04d}-{kind}.jpg"
        url = server.url + path
        caption = f"actor attends the premiere of the film number {row} ."
        if row == 1:
            caption = 'the word " on a sign'
        world.lines.append((caption, url))
        if kind == "o":
            server.files[path] = make_jpeg(seed * 1000 + row, size=image_size or (64 + row % 64, 48))
            world.ok.append(url)
        elif kind == "m":
            world.missing.append(url)
        elif kind == "n":
            server.files[path] = NOT_AN_IMAGE
            world.not_image.append(url)
        elif kind == "s":
            server.files[path] = make_jpeg(seed * 1000 + row, size=image_size or (64, 48))
            server.delays[path] = slow_seconds
            world.slow.append(url)
        else:
            raise ValueError(f"unknown kind {kind!r}")
    return world


def url_path(url: str) -> str:
    """`/train/0001-o.jpg` of `http://127.0.0.1:PORT/train/0001-o.jpg`."""
    return "/" + url.split("/", 3)[3]


def fix(server: ImageServer, urls: list[str], seed: int = 99) -> None:
    """Make `urls` serve a JPEG at once (the site came back)."""
    for number, url in enumerate(urls):
        path = url_path(url)
        server.files[path] = make_jpeg(seed * 1000 + number)
        server.delays.pop(path, None)
