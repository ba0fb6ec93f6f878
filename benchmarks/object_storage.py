"""Training from object storage: the data path and `mm train` reading s3:// (moto's server on 127.0.0.1) vs local disk.

    python benchmarks/object_storage.py [--config mmn-tiny] [--runs 3] [--epochs 2] [--num-workers 1]
                                        [--workdir /tmp/trimodal-bench-object-storage] [--no-tar-fallback]
                                        [--shards SHARDS --features STORE.zarr]

Prepares the mini data once in the workdir (`mm download mini`, `mm shard mini`, `mm featurize --device cpu`),
unless --shards and --features name it; with the tar fallback (the default) also a store without log-mels
(`mm featurize --audio none`), so that training computes them from the shards' tars. Then starts moto's S3
server (`python -m moto.server -H 127.0.0.1 -p PORT`), points this process and its children at it through
the environment only (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, a random AWS_SECRET_ACCESS_KEY that is never
printed, AWS_DEFAULT_REGION), makes a bucket and uploads the shards and the store(s) to it. In the same
process, local and s3 adjacent (which goes first alternates from run to run), each run measures:

(1) the data path alone: `TrimodalDataset` + `DataLoader` built as `mm train` builds them (the config's batch,
    seed, shuffle buffer, audio crop and the model's store inputs; `--num-workers` persistent workers), opened
    afresh (index.json, the store's metadata and checks; this process's S3 client is fsspec's cached one),
    one warm-up epoch (worker start, each worker's own S3 client and store opening), then `--epochs` timed
    epochs: samples/s of the timed epochs. With the full store the training stream reads the store only
    (the tars are not opened); the tar-fallback rows read the same store without log-mels, so each worker
    streams its pieces' tars in order (READ_AHEAD read-ahead blocks over s3) and computes the log-mels from
    the wavs;
(2) `mm train` end to end: `python -m trimodal train CONFIG --shards … --features … --out LOCAL_RUN
    train.epochs=E train.num_workers=K` as a subprocess (the run folder stays on local disk in both, so only
    the data source differs): wall seconds from start to exit (imports, opening, epochs, validation,
    checkpoints) and training samples (epochs × steps per epoch × batch) per wall second; also the trainer's
    own in-epoch samples/s (its metrics.jsonl records, epochs after the first: steps waiting on the loader,
    without imports, validation or checkpoints). Its output and every file of its run folder are checked not
    to hold the secret key.

Prints two markdown tables of the medians, the runs one by one, `tar fallback: s3 / local = R3 (data
path, …)` and last `object storage: s3 / local = R (data path), R2 (mm train end to end)` (samples/s of s3 over local).

moto's server is one Python process on loopback: no network latency or bandwidth limit, but each request costs
far more than S3's. The figure bounds the overhead of our streaming path (fsspec/s3fs requests, zarr chunk
reads, the tar read-ahead), not the throughput of S3 itself.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import time
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))

from mini_data import environment, find, mm, prepare  # noqa: E402

from trimodal.training.config import shipped_config  # noqa: E402

SECRET = secrets.token_hex(20)  # moto takes any key; this one must still never be printed


def redact(text: str) -> str:
    return text.replace(SECRET, "<secret>")








def prepare_without_mels(shards: Path, workdir: Path) -> Path:
    """A store of the same shards without log-mels: training computes them from the tars."""
    out = workdir / "features-no-audio.zarr"
    started = time.perf_counter()
    mm("featurize", shards, "--out", out, "--device", "cpu", "--audio", "none", "--overwrite", redact=redact)
    print(f"data: store without log-mels (mm featurize --audio none) in {time.perf_counter() - started:.0f} s")
    return out


# -- S3 on 127.0.0.1 ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise SystemExit(f"moto's server exited with {process.returncode} (is moto[server] installed?)")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return process, f"http://127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise SystemExit("moto's server did not start in 60 s") from None
            time.sleep(0.1)


def point_at(endpoint: str) -> None:
    """This process and its children talk to `endpoint`, with credentials in the environment only."""
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "trimodal-bench",
                       "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"})
    os.environ.pop("AWS_PROFILE", None)


def upload(folders: dict[str, Path]) -> tuple[str, dict[str, str]]:
    """A new bucket holding each folder under its name; (bucket, name -> s3:// URL)."""
    import fsspec

    fs = fsspec.filesystem("s3")
    bucket = f"trimodal-bench-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    urls = {}
    started, total = time.perf_counter(), 0
    for name, folder in folders.items():
        fs.put(str(folder), f"{bucket}/{name}", recursive=True)
        files = [p for p in folder.rglob("*") if p.is_file()]
        stored = fs.find(f"{bucket}/{name}")
        if len(stored) != len(files):
            raise SystemExit(f"uploaded {len(stored)} objects under {bucket}/{name}, want {len(files)} from {folder}")
        total += sum(p.stat().st_size for p in files)
        urls[name] = f"s3://{bucket}/{name}"
    seconds = time.perf_counter() - started
    print(f"upload: {total / 1e6:.1f} MB ({', '.join(folders)}) to s3://{bucket} in {seconds:.1f} s "
          f"({total / 1e6 / seconds:.1f} MB/s)")
    return bucket, urls


# -- (1) the data path --------------------------------------------------------------------------------------


@dataclass
class DataRun:
    open_s: float  # open_sources + TrimodalDataset (index.json, store metadata, checks)
    warmup_s: float  # the first epoch: worker start, its store opening, the epoch
    timed_s: float
    samples: int  # in the timed epochs

    @property
    def rate(self) -> float:
        return self.samples / self.timed_s


def data_path(config: Path, shards: str | Path, features: str | Path, epochs: int, workers: int) -> DataRun:
    """The training stream as `mm train` builds it (trimodal/training/trainer.py `_train`), on one rank."""
    import torch
    from torch.utils.data import DataLoader

    from trimodal.storage import absolute
    from trimodal.training.config import load_config
    from trimodal.training.data import TrimodalDataset, open_sources
    from trimodal.training.trainer import build_from_config, max_audio_frames

    began = time.perf_counter()
    run = load_config(config, [f"train.num_workers={workers}"])
    settings = run.train
    sources = open_sources(absolute(shards), absolute(features), ["train"])
    model, _ = build_from_config(run, sources.store.config)
    dataset = TrimodalDataset(sources, split="train", modalities=settings.modalities, batch_size=settings.batch_size,
                              shuffle=True, seed=settings.seed, shuffle_buffer=settings.shuffle_buffer,
                              max_audio_frames=max_audio_frames(settings, sources.store.config), drop_last=True,
                              streams=settings.data_streams or 1, accumulation=settings.grad_accum,
                              inputs=model.store_inputs())
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(settings.seed))
    opened = time.perf_counter()

    def epoch(number: int) -> int:
        dataset.set_epoch(number)
        return sum(len(batch["keys"]) for batch in loader)

    if epoch(0) == 0:
        raise SystemExit(f"the training stream from {shards} gave no samples")
    warmed = time.perf_counter()
    samples = sum(epoch(number) for number in range(1, epochs + 1))
    done = time.perf_counter()
    del loader  # its persistent workers end
    return DataRun(opened - began, warmed - opened, done - warmed, samples)


# -- (2) mm train end to end --------------------------------------------------------------------------------


@dataclass
class TrainRun:
    wall_s: float
    samples: int
    in_epoch: float  # the trainer's own samples/s (metrics.jsonl), in the epochs after the first

    @property
    def rate(self) -> float:
        return self.samples / self.wall_s


def train_run(config: Path, shards: str | Path, features: str | Path, out: Path, epochs: int,
              workers: int) -> TrainRun:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "trimodal", "train", str(config), "--shards", str(shards), "--features",
               str(features), "--out", str(out), f"train.epochs={epochs}", f"train.num_workers={workers}"]
    began = time.perf_counter()
    done = subprocess.run(command, cwd=REPOSITORY, env=environment(), capture_output=True, text=True)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(redact(f"mm train from {shards} failed ({done.returncode}):\n"
                                f"{done.stdout[-3000:]}{done.stderr[-3000:]}"))
    leaks = [path for path in out.rglob("*") if path.is_file() and SECRET.encode() in path.read_bytes()]
    if SECRET in done.stdout + done.stderr or leaks:
        raise SystemExit(f"mm train from {shards}: the secret key appears in its output or in {leaks}")
    resolved = tomllib.loads((out / "config.resolved.toml").read_text())
    steps = find(resolved, "steps_per_epoch")
    batch = find(resolved.get("train", {}), "batch_size") or find(resolved, "batch_size")
    accumulation = find(resolved.get("train", {}), "grad_accum") or 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["samples_per_s"] for r in records if r.get("type") == "train"]
    later = [r["samples_per_s"] for r in records if r.get("type") == "train" and r["epoch"] >= 1]
    return TrainRun(wall, int(epochs * steps * batch * accumulation), statistics.mean(later or rates or [0.0]))




# -- the report ---------------------------------------------------------------------------------------------


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="mmn-tiny", help="a shipped config's name or a TOML path")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/trimodal-bench-object-storage"),
                        help="emptied first when it receives the prepared data; runs go to WORKDIR/train-*")
    parser.add_argument("--runs", type=int, default=3, help="runs of each measurement (medians are reported)")
    parser.add_argument("--epochs", type=int, default=2,
                        help="timed epochs of the data path (after one warm-up epoch); epochs of mm train")
    parser.add_argument("--num-workers", type=int, default=1, help="loader workers (train.num_workers)")
    parser.add_argument("--no-tar-fallback", dest="tar_fallback", action="store_false",
                        help="skip the data path with the log-mels computed from the tars (saves a featurize)")
    parser.add_argument("--shards", type=Path, help="use these shards (with --features) instead of preparing mini")
    parser.add_argument("--features", type=Path)
    args = parser.parse_args()
    if (args.shards is None) != (args.features is None):
        parser.error("--shards and --features go together")
    config = Path(args.config) if Path(args.config).is_file() else shipped_config(args.config)
    print(f"load average at start: {load_average()}")
    if args.shards is None:
        shards, features = prepare(args.workdir)
    else:
        shards, features = args.shards.resolve(), args.features.resolve()
        args.workdir.mkdir(parents=True, exist_ok=True)
    folders = {"shards": shards, "features.zarr": features}
    if args.tar_fallback:
        folders["features-no-audio.zarr"] = prepare_without_mels(shards, args.workdir)

    server, endpoint = start_moto()
    try:
        point_at(endpoint)
        _, urls = upload(folders)
        data_sources = {"store": ("features.zarr", "the store (image, tokens, log-mels)")}
        if args.tar_fallback:
            data_sources["tars"] = ("features-no-audio.zarr", "store without log-mels: tars streamed, mels computed")
        data: dict[tuple[str, str], list[DataRun]] = {}
        trains: dict[str, list[TrainRun]] = {"local": [], "s3": []}
        for number in range(args.runs):
            order = ("local", "s3") if number % 2 == 0 else ("s3", "local")  # neither always goes first
            for kind, (store, _) in data_sources.items():
                for where in order:
                    source = (shards, folders[store]) if where == "local" else (urls["shards"], urls[store])
                    data.setdefault((kind, where), []).append(
                        data_path(config, *source, args.epochs, args.num_workers))
            for where in order:
                source = (shards, features) if where == "local" else (urls["shards"], urls["features.zarr"])
                trains[where].append(train_run(config, *source, args.workdir / f"train-{where}-{number + 1}",
                                               args.epochs, args.num_workers))
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
    report(args, config, data_sources, data, trains)


def report(args, config: Path, data_sources: dict, data: dict, trains: dict) -> None:
    median = statistics.median
    name = config.relative_to(REPOSITORY) if config.is_relative_to(REPOSITORY) else config
    print(f"config: {name}, {args.num_workers} loader worker(s), {args.runs} run(s) each (medians), local and s3 "
          f"adjacent, alternating which goes first; data path: {args.epochs} timed epoch(s) after a warm-up epoch; "
          f"mm train: train.epochs={args.epochs}, run folder on local disk")
    print("S3: moto's server, one Python process on 127.0.0.1 (no network latency, but slower per request than "
          "S3): the ratios bound the overhead of our streaming path, not S3 itself")
    print()
    print("| data path (TrimodalDataset + DataLoader) | source | open (s) | warm-up epoch (s) | timed epochs (s) "
          "| samples | samples/s | s3 / local |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    ratios = {}
    for kind, (_, label) in data_sources.items():
        local_rate = median(r.rate for r in data[(kind, "local")])
        for where in ("local", "s3"):
            runs = data[(kind, where)]
            rate = median(r.rate for r in runs)
            if where == "s3":
                ratios[kind] = rate / local_rate
            shown = "1" if where == "local" else f"{rate / local_rate:.2f}"
            print(f"| {label} | {where} | {median(r.open_s for r in runs):.2f} "
                  f"| {median(r.warmup_s for r in runs):.2f} | {median(r.timed_s for r in runs):.2f} "
                  f"| {runs[0].samples} | {rate:.0f} | {shown} |")
    print()
    print("| mm train end to end | source | wall (s) | samples | samples/s (wall) | in-epoch samples/s (trainer's log) "
          "| s3 / local (wall) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    local_train = median(r.rate for r in trains["local"])
    for where in ("local", "s3"):
        runs = trains[where]
        rate = median(r.rate for r in runs)
        if where == "s3":
            ratios["train"] = rate / local_train
        shown = "1" if where == "local" else f"{rate / local_train:.2f}"
        print(f"| train.epochs={args.epochs}, train.num_workers={args.num_workers} | {where} "
              f"| {median(r.wall_s for r in runs):.1f} | {runs[0].samples} | {rate:.1f} "
              f"| {median(r.in_epoch for r in runs):.1f} | {shown} |")
    print()
    for kind in data_sources:
        local, s3 = data[(kind, "local")], data[(kind, "s3")]
        paired = [round(b.rate / a.rate, 2) for a, b in zip(local, s3)]
        print(f"data path ({kind}) per run, samples/s: local {[round(r.rate) for r in local]}, "
              f"s3 {[round(r.rate) for r in s3]}; paired s3/local {paired}")
    local, s3 = trains["local"], trains["s3"]
    paired = [round(a.wall_s / b.wall_s, 2) for a, b in zip(local, s3)]
    print(f"mm train per run, wall s: local {[round(r.wall_s, 1) for r in local]}, "
          f"s3 {[round(r.wall_s, 1) for r in s3]}; paired s3/local samples/s {paired}")
    print("secret: in no output of mm train and no file of its run folders (checked every run)")
    print(f"load average at end: {load_average()}")
    if "tars" in ratios:
        print(f"tar fallback: s3 / local = {ratios['tars']:.2f} (data path, log-mels computed from the streamed tars)")
    print(f"object storage: s3 / local = {ratios['store']:.2f} (data path), "
          f"{ratios['train']:.2f} (mm train end to end)")


if __name__ == "__main__":
    main()
