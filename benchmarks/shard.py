"""Throughput of `mm shard --workers 2` against `tar -cf` of the same source files.

    python benchmarks/shard.py [--layout flickr8k|coco2014] [--images 1000] [--runs 3] [--workdir DIR]

Builds a tree of real file sizes, warms the page cache, then times each command `--runs` times (fresh
output each run) and prints `shard: X MB/s vs tar Y MB/s, ratio Z` from the medians. MB are source
bytes (1 MB = 1e6 B). flickr8k: Flickr8k + FACC, 500x375 jpg of ~106 KB, 4 s 16 kHz wavs of 128 KB, five
per image. coco2014: COCO + Karpathy + SpokenCOCO, 640x480 jpg of ~150 KB (val2014 averages 164 KB),
3.3 s wavs of ~106 KB (SpokenCOCO's 64 GB over ~605k utterances), five to seven per image.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.builders import build_flickr_tree  # noqa: E402
from tests.coco_builders import build_coco_tree  # noqa: E402


def source_files(root: Path) -> list[Path]:
    return [Path(d) / f for d, _, names in os.walk(root) for f in names if not f.startswith(".")]


def warm(files: list[Path]) -> None:
    for path in files:
        path.read_bytes()


def timed(command: list[str], cleanup: Path) -> float:
    shutil.rmtree(cleanup, ignore_errors=True)
    cleanup.mkdir(parents=True) if cleanup.suffix != ".tar" else cleanup.unlink(missing_ok=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=("flickr8k", "coco2014"), default="flickr8k")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="default /tmp/trimodal-bench-shard-<layout>")
    args = parser.parse_args()
    args.workdir = args.workdir or Path(f"/tmp/trimodal-bench-shard-{args.layout}")

    root = args.workdir / "data"
    train = args.images * 8 // 10
    val = (args.images - train) // 2
    # Written once the tree is complete: a build cut short, or one of another size, is made again.
    built = args.workdir / "images"
    if not built.is_file() or built.read_text() != str(args.images):
        shutil.rmtree(args.workdir, ignore_errors=True)
        if args.layout == "flickr8k":
            build_flickr_tree(root, train=train, val=val, test=args.images - train - val, outside=0, quirk=False,
                              image_size=(500, 375), jpeg_quality=70, wav_seconds=4.0)
        else:
            build_coco_tree(root, train=train * 3 // 4, restval=train - train * 3 // 4, val=val,
                            test=args.images - train - val, image_size=(640, 480), jpeg_quality=65, wav_seconds=3.3)
        built.write_text(str(args.images))
    audio = {"flickr8k": "facc", "coco2014": "spokencoco"}[args.layout]
    files = source_files(root)
    megabytes = sum(path.stat().st_size for path in files) / 1e6
    warm(files)

    shard_command = [sys.executable, "-m", "trimodal", "shard", args.layout, "--root", str(root),
                     "--out", str(args.workdir / "shards"), "--workers", "2"]
    tar_command = ["tar", "-cf", str(args.workdir / "baseline.tar"), "-C", str(root), args.layout, audio]
    shard_times, tar_times = [], []
    for _ in range(args.runs):
        shard_times.append(timed(shard_command, args.workdir / "shards"))
        tar_times.append(timed(tar_command, args.workdir / "baseline.tar"))
    shard_rate = megabytes / statistics.median(shard_times)
    tar_rate = megabytes / statistics.median(tar_times)
    print(f"{args.layout} source: {len(files)} files, {megabytes:.0f} MB; shard runs {[round(t, 2) for t in shard_times]} s, "
          f"tar runs {[round(t, 2) for t in tar_times]} s")
    print(f"shard: {shard_rate:.0f} MB/s vs tar {tar_rate:.0f} MB/s, ratio {shard_rate / tar_rate:.2f}")


if __name__ == "__main__":
    main()
