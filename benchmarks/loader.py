"""Throughput of the training data path (`mm train`'s shards + store) against a naive map-style dataset.

    python benchmarks/loader.py --shards SHARDS --features STORE.zarr [--runs 3] [--split train]

Both run through a torch DataLoader with 2 workers and batches of 64, on the same split, with a warm page
cache; each run is one full pass over the split, and the medians are compared:

(a) `TrimodalDataset`: whole shards, one store slice per array, padded batches of cached features;
(b) the naive way of the original scripts: per sample, open the jpg (PIL decode, resize to 224, to
    tensor), read each wav with soundfile and compute its log-mel, tokenize the captions.

Prints `loader: X samples/s vs naive Y samples/s, ratio Z`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import soundfile  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from trimodal.features.audio import MelExtractor  # noqa: E402
from trimodal.features.text import OpenClipTokenizer  # noqa: E402
from trimodal.pipeline.sources import scan_source  # noqa: E402
from trimodal.training.data import TrimodalDataset  # noqa: E402

BATCH, WORKERS = 64, 2


class NaiveDataset(Dataset):
    """One raw sample per index, decoded and featurised from the original files every time."""

    def __init__(self, samples):
        self.samples = samples
        self.mel = None
        self.tokenizer = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        if self.mel is None:  # built in the worker, as the scripts do
            self.mel, self.tokenizer = MelExtractor(), OpenClipTokenizer("open_clip:ViT-B-32")
        sample = self.samples[index]
        image = Image.open(sample.image).convert("RGB").resize((224, 224), Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mels = []
        for caption in sample.captions:
            if caption.audio is not None:
                samples, rate = soundfile.read(caption.audio, dtype="float32")
                mels.append(self.mel([self.mel.resample(samples, rate)])[0])
        tokens = torch.from_numpy(self.tokenizer([c.text for c in sample.captions]))
        return {"image": pixels, "mels": mels, "tokens": tokens}


def naive_collate(items: list[dict]) -> dict:
    frames = max(len(m) for item in items for m in item["mels"])
    audio = torch.zeros(len(items), 5, frames, 80)
    for row, item in enumerate(items):
        for n, mel in enumerate(item["mels"][:5]):
            audio[row, n, : len(mel)] = torch.from_numpy(mel)
    return {"image": torch.stack([i["image"] for i in items]), "audio": audio,
            "text": torch.stack([i["tokens"] for i in items])}


def warm_page_cache(samples) -> None:
    """Read every raw file once, as the shards and the store are read by the warm-up pass."""
    for sample in samples:
        # Caption.audio is a str, not a Path (cheaper at SpokenCOCO's 605k utterances).
        for path in [sample.image, *(c.audio for c in sample.captions)]:
            if path is not None:
                Path(path).read_bytes()


def timed_pass(loader) -> tuple[float, int]:
    started, count = time.perf_counter(), 0
    for batch in loader:
        count += len(batch["image"])
    return time.perf_counter() - started, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--features", type=Path, required=True)
    parser.add_argument("--split", default="train")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # per worker, as DataLoader workers are

    index = json.loads((args.shards / "index.json").read_text())
    root = Path(index["source"]["root"])
    raw = [s for s in scan_source(index["dataset"], root).samples if s.split == args.split]
    warm_page_cache(raw)

    ours = TrimodalDataset(args.shards, args.features, args.split, batch_size=BATCH, shuffle=True)
    naive = NaiveDataset(raw)
    fast = DataLoader(ours, batch_size=None, num_workers=WORKERS)
    slow = DataLoader(naive, batch_size=BATCH, shuffle=True, num_workers=WORKERS, collate_fn=naive_collate)
    timed_pass(fast)  # warm-up: page cache of tars and store
    ours_rates, naive_rates = [], []
    for run in range(args.runs):
        ours.set_epoch(run)
        seconds, count = timed_pass(fast)
        ours_rates.append(count / seconds)
        seconds, count = timed_pass(slow)
        naive_rates.append(count / seconds)
    a, b = statistics.median(ours_rates), statistics.median(naive_rates)
    print(f"split {args.split}: {len(raw)} samples; ours {[round(r) for r in ours_rates]} samples/s, "
          f"naive {[round(r) for r in naive_rates]} samples/s")
    print(f"loader: {a:.0f} samples/s vs naive {b:.0f} samples/s, ratio {a / b:.1f}")


if __name__ == "__main__":
    main()
