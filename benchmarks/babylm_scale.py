"""Peak memory and rate of `mm shard babylm-mm` and the `.npy` import of `mm featurize` at a million rows.

    python benchmarks/babylm_scale.py [--rows 1000000] [--workdir /tmp/trimodal-bench-babylm]

Generates a BabyLM-format set (`cc_3M_captions.json` + the two float32 (N/2, 768) `.npy` halves: the
real names and formats; about 3 GB for a million rows), then runs, each in its own process under GNU
time (which reports that process's peak RSS): `mm validate`, `mm shard` (10,000 samples per shard), and
`mm featurize --image precomputed --text none` (the import alone: rows per second), then the default
featurize with caption tokens. Baseline: the same interpreter importing trimodal and doing nothing else.
The matrix alone is printed next to the peaks: a step that loaded it would show at least that much.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trimodal.pipeline.synthesize.babylm import WIDTH, write_babylm  # noqa: E402


def measured(command: list[str]) -> tuple[float, float, int, str]:
    """(seconds, peak RSS in MB, exit status, stderr tail) of one command in its own process."""
    started = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-f", "peak-kb %M", *command], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    lines = result.stderr.splitlines()
    peak_kb = next(int(line.split()[1]) for line in reversed(lines) if line.startswith("peak-kb"))
    return seconds, peak_kb / 1024, result.returncode, "\n".join(lines[-5:-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/trimodal-bench-babylm"))
    parser.add_argument("--skip-tokens", action="store_true", help="Skip the featurize run that also tokenises.")
    args = parser.parse_args()
    root = args.workdir / "data"
    captions = root / "babylm-mm" / "cc_3M_captions.json"
    # Written once the set is complete: a generation cut short, or one of another size, is made again.
    generated = args.workdir / "rows"
    if not generated.is_file() or generated.read_text() != str(args.rows):
        shutil.rmtree(args.workdir, ignore_errors=True)
        started = time.perf_counter()
        write_babylm(root / "babylm-mm", cc3m=args.rows)
        generated.write_text(str(args.rows))
        print(f"generated {args.rows:,} rows in {time.perf_counter() - started:.0f} s "
              f"(captions {captions.stat().st_size / 1e6:.0f} MB, features {args.rows * WIDTH * 4 / 1e9:.2f} GB)")
    shards, store = args.workdir / "shards", args.workdir / "features.zarr"
    shutil.rmtree(shards, ignore_errors=True)
    shutil.rmtree(store, ignore_errors=True)
    mm = [sys.executable, "-m", "trimodal"]
    steps = {
        "import only (baseline)": [sys.executable, "-c", "import trimodal.pipeline.shard.writer, trimodal.features.featurize"],
        "mm validate babylm-mm": [*mm, "validate", "babylm-mm", "--root", str(root)],
        "mm shard babylm-mm": [*mm, "shard", "babylm-mm", "--root", str(root), "--out", str(shards),
                               "--max-samples", "10000"],
        "mm featurize (npy import only)": [*mm, "featurize", str(shards), "--out", str(store), "--image", "precomputed",
                                           "--text", "none", "--audio", "none", "--device", "cpu"],
    }
    if not args.skip_tokens:
        steps["mm featurize (import + caption tokens)"] = [*mm, "featurize", str(shards), "--out",
                                                           str(args.workdir / "tokens.zarr"), "--image", "precomputed",
                                                           "--device", "cpu"]
    print(f"rows: {args.rows:,}; the float32 matrix alone is {args.rows * WIDTH * 4 / 2**20:,.0f} MB")
    print("| step | seconds | rows/s | peak RSS (MB) | exit |")
    print("|---|---:|---:|---:|---:|")
    for name, command in steps.items():
        seconds, peak, status, tail = measured(command)
        rate = "" if "baseline" in name else f"{args.rows / seconds:,.0f}"
        print(f"| {name} | {seconds:.1f} | {rate} | {peak:,.0f} | {status} |", flush=True)
        if status:
            print(tail)


if __name__ == "__main__":
    main()
