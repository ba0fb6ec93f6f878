"""Builds small datasets and archives in the real Flickr8k / FACC layouts, for hermetic tests."""

from __future__ import annotations

import hashlib
import io
import random
import tarfile
import threading
import wave
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

QUIRK_STEM = "2258277193_586949ec62"


def make_jpeg(seed: int, size: tuple[int, int] = (64, 48), quality: int = 85) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def make_wav(seconds: float = 0.25, rate: int = 16_000, channels: int = 1, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    frames = (rng.normal(0, 3000, size=(int(seconds * rate), channels))).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(frames.tobytes())
    return buffer.getvalue()


def stem(number: int) -> str:
    return f"{1000000 + number}_{hashlib.md5(str(number).encode()).hexdigest()[:10]}"


@dataclass
class FlickrTree:
    root: Path
    name: str
    splits: dict[str, list[str]]
    outside: list[str] = field(default_factory=list)

    @property
    def dataset_dir(self) -> Path:
        return self.root / self.name

    @property
    def image_dir(self) -> Path:
        return self.dataset_dir / "Flicker8k_Dataset"

    @property
    def facc_dir(self) -> Path:
        return self.root / "facc" / "flickr_audio"

    def image(self, key: str) -> Path:
        return self.image_dir / f"{key}.jpg"

    def wav(self, key: str, caption: int) -> Path:
        return self.facc_dir / "wavs" / f"{key}_{caption}.wav"

    def caption(self, key: str, caption: int) -> str:
        return f"caption {caption} of image {key} ."

    @property
    def token_file(self) -> Path:
        return self.dataset_dir / "Flickr8k.token.txt"


def build_flickr_tree(root: Path, *, name: str = "flickr8k", train: int = 8, val: int = 3, test: int = 3,
                      outside: int = 1, facc: bool = True, quirk: bool = True, image_size=(64, 48),
                      jpeg_quality: int = 85, wav_seconds: float = 0.25, seed: int = 0) -> FlickrTree:
    """Flickr8k as its two zips unpack (+ FACC under ROOT/facc/), with 5 captions per image."""
    rng = random.Random(seed)
    keys = [stem(i) for i in range(train + val + test + outside)]
    splits = {"train": keys[:train], "val": keys[train : train + val], "test": keys[train + val : train + val + test]}
    tree = FlickrTree(root, name, splits, keys[train + val + test :])
    tree.image_dir.mkdir(parents=True)
    for number, key in enumerate(keys):
        tree.image(key).write_bytes(make_jpeg(seed * 10_000 + number, image_size, jpeg_quality))

    lines = []
    for key in keys:
        lines += [f"{key}.jpg#{n}\t{tree.caption(key, n)}\n" for n in range(5)]
    if quirk:  # the real file's `.jpg.1#0` line, for an image in no split and absent from the folder
        lines.append(f"{QUIRK_STEM}.jpg.1#0\tpeople waiting for the subway\n")
        lines += [f"{QUIRK_STEM}.jpg#{n}\tThree people at a station .\n" for n in range(1, 5)]
    tree.token_file.write_text("".join(lines), encoding="utf-8")
    for split, file_name in (("train", "Flickr_8k.trainImages.txt"), ("val", "Flickr_8k.devImages.txt"),
                             ("test", "Flickr_8k.testImages.txt")):
        (tree.dataset_dir / file_name).write_text("".join(f"{k}.jpg\n" for k in splits[split]), encoding="utf-8")
    (tree.dataset_dir / "readme.txt").write_text("test fixture\n", encoding="utf-8")

    if facc:
        (tree.facc_dir / "wavs").mkdir(parents=True)
        entries = []
        for split_keys in splits.values():
            for key in split_keys:
                for n in range(5):
                    tree.wav(key, n).write_bytes(make_wav(wav_seconds, seed=zlib.crc32(f"{key}_{n}".encode())))
                    entries.append((f"{key}_{n}.wav", key, n, rng.randint(1, 183)))
        rng.shuffle(entries)
        (tree.facc_dir / "wav2capt.txt").write_text("".join(f"{w} {k}.jpg #{n}\n" for w, k, n, _ in entries))
        (tree.facc_dir / "wav2spk.txt").write_text("".join(f"{w} {s}\n" for w, _, _, s in entries))
        (root / "facc" / ".trimodal-download.json").write_text('{"complete": true, "dataset": "facc"}')
    return tree


def build_archives(tree: FlickrTree) -> dict[str, bytes]:
    """The three published archives rebuilt from a tree, in their real layouts (with macOS litter)."""
    images = io.BytesIO()
    with zipfile.ZipFile(images, "w") as bundle:
        bundle.writestr("Flicker8k_Dataset/", b"")
        for path in sorted(tree.image_dir.iterdir()):
            bundle.write(path, f"Flicker8k_Dataset/{path.name}")
            bundle.writestr(f"__MACOSX/Flicker8k_Dataset/._{path.name}", b"\x00\x05\x16\x07resource fork")
    text = io.BytesIO()
    with zipfile.ZipFile(text, "w") as bundle:
        for path in sorted(tree.dataset_dir.glob("*.txt")):
            bundle.write(path, path.name)
        bundle.writestr("__MACOSX/._Flickr8k.token.txt", b"\x00\x05\x16\x07")
    audio = io.BytesIO()
    with tarfile.open(fileobj=audio, mode="w:gz") as bundle:
        bundle.add(tree.facc_dir, arcname="flickr_audio")
    return {"Flickr8k_Dataset.zip": images.getvalue(), "Flickr8k_text.zip": text.getvalue(),
            "flickr_audio.tar.gz": audio.getvalue()}


def zip_with(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for name, data in members.items():
            bundle.writestr(name, data)
    return buffer.getvalue()


def tar_with(members: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as bundle:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                bundle.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                bundle.addfile(info, io.BytesIO(member[1]))
    return buffer.getvalue()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def shard_members(out: Path) -> dict[str, bytes]:
    """{member name: bytes} over every tar of a shard folder."""
    members = {}
    for path in sorted(Path(out).glob("*.tar")):
        with tarfile.open(path) as tar:
            members.update({member.name: tar.extractfile(member).read() for member in tar.getmembers()})
    return members


def manifest_expecting(name: str, files: dict[str, bytes], urls=None):
    """The real manifest of `name` expecting the test archives' digests, of the kinds it publishes (none for
    an archive whose checksum is unpublished); `urls(file)` gives other URLs."""
    import dataclasses

    from trimodal.pipeline.download.manifest import load_manifest

    real = load_manifest(name)

    def expecting(archive):
        data = files[archive.file]
        return dataclasses.replace(
            archive, urls=tuple(urls(archive.file)) if urls else archive.urls,
            md5=md5(data) if archive.md5 else None,
            sha256=hashlib.sha256(data).hexdigest() if archive.sha256 else None)

    return dataclasses.replace(real, archives=tuple(expecting(archive) for archive in real.archives))


def flickr_shards(root: Path, *, train: int, val: int, test: int, wav_seconds: float, max_samples: int) -> Path:
    """A small Flickr8k + FACC tree under `root/data`, sharded into `root/shards`."""
    from trimodal.pipeline.shard.writer import ShardOptions
    from trimodal.pipeline.datasets import shard_dataset

    build_flickr_tree(root / "data", train=train, val=val, test=test, wav_seconds=wav_seconds)
    shard_dataset("flickr8k", root / "data", root / "shards", ShardOptions(max_samples=max_samples))
    return root / "shards"


@contextmanager
def serving(httpd):
    """Run `httpd` (a ThreadingHTTPServer) on a daemon thread for the block, then shut it down."""
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
