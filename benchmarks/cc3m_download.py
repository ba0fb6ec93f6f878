"""`mm download cc3m` against a loopback web: success, failure and retry counts, and URLs per second.

    python benchmarks/cc3m_download.py [--rows 400] [--val-rows 100] [--processes 2] [--threads 32]
                                       [--samples-per-shard 100] [--workdir DIR] [--no-baseline]

Serves the two TSVs and their images on 127.0.0.1 (500x375 noise JPEGs of ~100 KB, which img2dataset resizes
to 256 px as in its cc3m recipe). Of the URLs, 80 % serve an image, 10 % are 404, 5 % serve an HTML page
and 5 % answer after 2 s (timeout 1 s). Runs the library call behind `mm download cc3m` (TSVs fetched and
verified, then img2dataset), then "fixes" the web (all but the 404s) and runs `--retry-failed`. The
baseline runs `img2dataset.download` itself on the same train URLs as its cc3m recipe does (the TSV with a
header line prepended), in a fresh interpreter, for the cost of our child process and polling.
URLs/s = URLs tried / wall time of the whole call, startup included.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.web_builders import build_url_world, fix, serve_images  # noqa: E402
from trimodal.pipeline.datasets import download_dataset  # noqa: E402
from trimodal.pipeline.download.fetch import FetchPolicy  # noqa: E402
from trimodal.pipeline.sources import cc3m  # noqa: E402
from trimodal.pipeline.download.url_report import completed_shards  # noqa: E402

TIMEOUT_SECONDS = 1.0
SLOW_SECONDS = 2.0

BASELINE = """
import sys
from img2dataset import download
download(url_list=sys.argv[1], input_format="tsv", url_col="url", caption_col="caption",
         output_format="webdataset", output_folder=sys.argv[2], processes_count=int(sys.argv[3]),
         thread_count=int(sys.argv[4]), image_size=256, number_sample_per_shard=int(sys.argv[5]),
         timeout=float(sys.argv[6]), enable_wandb=False)
"""


def kinds(rows: int, seed: int) -> str:
    """o = image, m = 404, n = not an image, s = slow; shuffled with a fixed seed."""
    counts = {"m": rows // 10, "n": rows // 20, "s": rows // 20}
    letters = [kind for kind, count in counts.items() for _ in range(count)]
    letters += ["o"] * (rows - len(letters))
    random.Random(seed).shuffle(letters)
    return "".join(letters)


def summary(step: dict) -> str:
    lines = []
    for split, info in step["splits"].items():
        reasons = ", ".join(f"{r['count']} {r['message'] or r['status']}" for r in info["reasons"])
        line = f"  {split}: {info['downloaded']}/{info['rows']} downloaded, {info['failed']} failed ({reasons or '-'})"
        if "retry" in info:
            retry = info["retry"]
            line += (f"; retry: {retry['queued']} queued into shards {retry['shards']}, "
                     f"{retry['downloaded_before']} -> {retry['downloaded_after']}")
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400, help="train URLs")
    parser.add_argument("--val-rows", type=int, default=100)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--samples-per-shard", type=int, default=100)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/trimodal-bench-cc3m"))
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    root = args.workdir / "data"
    cc3m.TIMEOUT_SECONDS = TIMEOUT_SECONDS
    cc3m.SAMPLES_PER_SHARD = args.samples_per_shard
    options = {"processes": args.processes, "threads": args.threads}
    policy = FetchPolicy(attempts_per_url=2, backoff_seconds=0.1)

    with serve_images() as server:
        started = time.perf_counter()
        train = build_url_world(server, "train", kinds(args.rows, 0), slow_seconds=SLOW_SECONDS, seed=0,
                                image_size=(500, 375))
        val = build_url_world(server, "val", kinds(args.val_rows, 1), slow_seconds=SLOW_SECONDS, seed=1,
                              image_size=(500, 375))
        server.files["/" + cc3m.TSV_FILES["train"]] = train.tsv
        server.files["/" + cc3m.TSV_FILES["val"]] = val.tsv
        print(f"loopback web: {args.rows} train + {args.val_rows} val URLs, "
              f"{sum(map(len, server.files.values())) / 1e6:.1f} MB, built in {time.perf_counter() - started:.1f} s")
        print(f"img2dataset: {args.processes} processes x {args.threads} threads, {args.samples_per_shard} URLs "
              f"per shard, timeout {TIMEOUT_SECONDS:g} s")

        if not args.no_baseline:
            baseline(args, {"train": train, "val": val})

        started = time.perf_counter()
        first = download_dataset("cc3m", root, mirror=server.url, download_options=options, policy=policy)
        first_seconds = time.perf_counter() - started
        tried = sum(info["rows"] for info in first.step["splits"].values())
        print(f"\nmm download cc3m (TSVs fetched and verified, then img2dataset): {first_seconds:.1f} s, "
              f"{tried / first_seconds:.1f} URLs/s")
        print(summary(first.step))
        print(f"  img2dataset's own rate on train (first shard start to last shard end): "
              f"{_shard_rate(root / 'cc3m' / 'train'):.1f} URLs/s")

        fix(server, [*train.not_image, *train.slow, *val.not_image, *val.slow])
        started = time.perf_counter()
        retried = download_dataset("cc3m", root, mirror=server.url, policy=policy,
                                   download_options={**options, "retry_failed": True})
        retry_seconds = time.perf_counter() - started
        queued = sum(info["retry"]["queued"] for info in retried.step["splits"].values())
        print(f"\nmm download cc3m --retry-failed (all but the 404s fixed): {retry_seconds:.1f} s, "
              f"{queued / retry_seconds:.1f} URLs/s")
        print(summary(retried.step))

        started = time.perf_counter()
        again = download_dataset("cc3m", root, mirror=server.url, policy=policy, download_options=options)
        print(f"\nrerun of the complete download: {time.perf_counter() - started:.2f} s, "
              f"already complete: {again.already_complete}")


def baseline(args, worlds: dict) -> None:
    """img2dataset itself on each split as its cc3m recipe runs it (the TSV with a header line prepended),
    one fresh interpreter per split, on the same web our first run sees."""
    started = time.perf_counter()
    downloaded = rows = 0
    for split, world in worlds.items():
        headed = args.workdir / f"baseline-{split}.tsv"
        headed.parent.mkdir(parents=True, exist_ok=True)
        headed.write_bytes(b"caption\turl\n" + world.tsv)
        output = args.workdir / "baseline" / split
        subprocess.run([sys.executable, "-c", BASELINE, str(headed), str(output), str(args.processes),
                        str(args.threads), str(args.samples_per_shard), str(TIMEOUT_SECONDS)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
        stats = completed_shards(output).values()
        downloaded += sum(s["successes"] for s in stats)
        rows += sum(s["count"] for s in stats)
    seconds = time.perf_counter() - started
    print(f"\nbaseline, img2dataset.download per split as in its recipe: {seconds:.1f} s, {rows / seconds:.1f} "
          f"URLs/s, {downloaded}/{rows} downloaded")
    print(f"  img2dataset's own rate on train (first shard start to last shard end): "
          f"{_shard_rate(args.workdir / 'baseline' / 'train'):.1f} URLs/s")


def _shard_rate(folder: Path) -> float:
    stats = list(completed_shards(folder).values())
    span = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)
    return sum(s["count"] for s in stats) / span if span else float("nan")


if __name__ == "__main__":
    main()
