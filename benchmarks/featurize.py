"""Featurize throughput next to the pure model time on the same batches: the pipeline's overhead.

    python benchmarks/featurize.py --shards SHARDS [--small val] [--large train] [--device auto]
        [--image open_clip:ViT-B-32 | timm:vit_base_patch14_dinov2] [--batch-size 64] [--workers 2]

End to end is `featurize()` into a fresh store, run once on a small split and once on a large one; the
difference (large minus small) gives the steady-state rate without the fixed start-up (building the
image tower, opening the store), which is printed separately. Model only is the log-mel extractor on
the large split's waveforms, already decoded, and the image tower on its batches, already decoded and
preprocessed (PIL, as on CPU). Prints `mel: X utt/s end to end vs Y utt/s model only (overhead Z%)` and
the same for images, then both ratios as `image: end-to-end / model-only = X%` (the goal on a GPU is at
least 70%). SHARDS: e.g. `python benchmarks/shard.py` leaves the 1,000-image Flickr8k-sized tree's
shards in /tmp/trimodal-bench-shard-flickr8k/shards.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from trimodal.features.audio import MelExtractor, decode_wav  # noqa: E402
from trimodal.features.featurize import FeaturizeOptions, featurize  # noqa: E402
from trimodal.distributed import resolve_device  # noqa: E402
from trimodal.features.image import make_image_extractor  # noqa: E402
from trimodal.pipeline.read.shards import iter_samples  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--small", default="val")
    parser.add_argument("--large", default="train")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--image", default="open_clip:ViT-B-32", help="an image tower, e.g. timm:vit_base_patch14_dinov2")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    device = resolve_device(args.device)
    index = json.loads((args.shards / "index.json").read_text())
    workdir = Path(tempfile.mkdtemp())

    def end_to_end(split: str, **options) -> float:
        shutil.rmtree(workdir / "f.zarr", ignore_errors=True)
        started = time.perf_counter()
        featurize(args.shards, workdir / "f.zarr", FeaturizeOptions(
            splits=(split,), device=args.device, batch_size=args.batch_size, workers=args.workers, **options))
        synchronize(device)
        return time.perf_counter() - started

    def steady(what: str, **options) -> tuple[float, float]:
        small, large = (end_to_end(split, **options) for split in (args.small, args.large))
        extra = index["splits"][args.large][what] - index["splits"][args.small][what]
        rate = extra / (large - small)
        return rate, small - index["splits"][args.small][what] / rate

    blobs = [m for s in index["splits"][args.large]["shards"] for _, m in iter_samples(args.shards / s["name"])]
    print(f"splits {args.small} / {args.large}: {index['splits'][args.small]['samples']} / {len(blobs)} images, "
          f"device {device}, {args.workers} decode threads")

    extractor = MelExtractor(device=device)
    waveforms = [extractor.resample(*decode_wav(m[s])) for m in blobs for s in sorted(m) if s.endswith(".wav")]
    extractor.batched(waveforms[: args.batch_size], args.batch_size)
    synchronize(device)
    started = time.perf_counter()
    extractor.batched(waveforms, args.batch_size)
    synchronize(device)
    model_only = len(waveforms) / (time.perf_counter() - started)
    full, fixed = steady("utterances", audio="mel80", image=None, text=None)
    print(f"mel: {full:.0f} utt/s end to end vs {model_only:.0f} utt/s model only "
          f"(overhead {100 * (model_only / full - 1):.0f}%; fixed start-up {fixed:.1f} s)")
    mel_ratio = full / model_only

    encoder = make_image_extractor(args.image, device)
    batches = [encoder.pixels([m.get("jpg") or m.get("png") for m in blobs[i : i + args.batch_size]])
               for i in range(0, len(blobs), args.batch_size)]
    encoder.encode_pixels(batches[0])
    synchronize(device)
    started = time.perf_counter()
    for pixels in batches:
        encoder.encode_pixels(pixels)
    synchronize(device)
    model_only = len(blobs) / (time.perf_counter() - started)
    full, fixed = steady("samples", audio=None, image=args.image, text=None)
    print(f"image ({args.image}): {full:.1f} img/s end to end vs {model_only:.1f} img/s model only "
          f"(overhead {100 * (model_only / full - 1):.0f}%; fixed start-up {fixed:.1f} s)")
    print(f"image: end-to-end / model-only = {100 * full / model_only:.0f}%")
    print(f"mel: end-to-end / model-only = {100 * mel_ratio:.0f}%   (goal on a GPU: at least 70% each)")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
