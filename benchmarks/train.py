"""Training speed: `mm train`'s full path against the same model stepping on one batch already on the device.

    python benchmarks/train.py --config configs/nlmm-tiny.toml --shards SHARDS --features STORE.zarr \
        [--epochs 3] [--steps 30] [--device auto] [--flickr8k-images 6000] [--nproc N] [section.key=value ...]

(a) full path: `trimodal.training.trainer.train` for `--epochs` epochs into a temporary run folder; its
    steps/s counts only the time inside the training epochs (streaming shards + store through the
    DataLoader, host→device copies, forward, loss, backward, the family's optimizer step(s), logging),
    not validation, checkpoints or plots;
(b) model-only: the same model and optimization built from the same config, one collated batch moved
    to the device once, then `--steps` timed steps (after 3 warm-up steps) of forward, loss, backward
    and optimizer step.

Prints `train: X steps/s vs model-only Y steps/s, ratio Z` and the epochs per hour that (a) gives on
Flickr8k-scale data (`--flickr8k-images` training images, one sample per image per epoch).

`--nproc N` adds (d): the full path (a) again under torchrun with N ranks (the same global batch, each rank
taking 1/N of it; gloo on the CPU, NCCL on GPUs), and prints `ranks: 1 rank X samples/s, N ranks Y samples/s,
scaling efficiency Z` (Y ÷ (N × X)), samples counted over all ranks inside the training epochs.

For `cman`, `--full-towers` adds (c): the same model on the same batch, but every step first runs the
frozen towers from raw inputs up to the cached layer (under no_grad: image stem + blocks on the batch's
preprocessed pixels, text stem + blocks on its token ids, the speech tower on its 16 kHz waveforms, one
utterance at a time as featurize does) instead of reading those states from the store; the jpg and wav
decoding is done once, before the timing. Prints `partial caching: X steps/s vs full towers Y steps/s,
ratio Z` (model-only (b) is the partial-caching figure).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from trimodal.distributed import resolve_device  # noqa: E402
from trimodal.training.config import load_config  # noqa: E402
from trimodal.training.data import TrimodalDataset, open_sources  # noqa: E402
from trimodal.training.trainer import (StepLoss, build_from_config, enter_stage, max_audio_frames,  # noqa: E402
                                       stage_weights, train)


def full_path(config: Path, shards: Path, features: Path, epochs: int, overrides: list[str]) -> dict:
    """`train()` into a temporary run folder (this process, or one rank of a torchrun): steps/s and samples/s
    inside the training epochs."""
    with tempfile.TemporaryDirectory(prefix="trimodal-bench-train-") as folder:
        result = train(config, shards, features, Path(folder) / "run",
                       overrides=[*overrides, f"train.epochs={epochs}"])
    return {"steps_per_s": result.train_steps / result.train_seconds, "steps": result.train_steps,
            "samples_per_s": result.samples_seen / result.train_seconds, "world_size": result.world_size}


def full_path_on_ranks(args, overrides: list[str], ranks: int) -> dict:
    """(a) under `torchrun --nproc-per-node ranks`, this script in its --rank-of-many mode; rank 0's numbers."""
    with tempfile.TemporaryDirectory(prefix="trimodal-bench-ranks-") as folder:
        out = Path(folder) / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                   __file__, "--config", args.config, "--shards", args.shards, "--features", args.features,
                   "--epochs", str(args.epochs), "--rank-of-many", str(out), *overrides]
        finished = subprocess.run(list(map(str, command)), capture_output=True, text=True)
        if finished.returncode != 0:
            raise SystemExit(f"torchrun with {ranks} ranks failed:\n{finished.stdout[-3000:]}{finished.stderr[-3000:]}")
        return json.loads(out.read_text())


def model_only(config: Path, shards: Path, features: Path, steps: int, overrides: list[str],
               towers: bool = False) -> float:
    """Steps/s of the model alone on one batch on the device; with `towers`, each step first recomputes
    the cached tower states from raw inputs (see the module doc, (c))."""
    run = load_config(config, overrides)
    settings = run.train
    sources = open_sources(shards, features, ["train"])
    store = sources.store
    device = resolve_device(settings.device)
    model, _ = build_from_config(run, store.config)
    model.to(device).train()
    dataset = TrimodalDataset(sources, split="train", modalities=settings.modalities, batch_size=settings.batch_size,
                              shuffle=True, seed=settings.seed, shuffle_buffer=settings.shuffle_buffer,
                              max_audio_frames=max_audio_frames(settings, store.config), drop_last=True,
                              inputs=model.store_inputs())
    batch = next(iter(dataset))
    raw = RawTowers(store.config, shards, batch, device) if towers else None
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    weights = stage_weights(settings, enter_stage(model, settings, 0))
    optimization = model.make_optimization(settings, total_steps=10 * steps)
    step_loss = StepLoss(model, settings.modalities, settings.amp)

    def one_step(step: int) -> int:
        loss, _ = step_loss(raw.batch(batch) if raw else batch, weights)
        loss.backward()
        step = optimization.step(step, loss)
        model.after_optimizer_step()
        return step

    step = 0
    for _ in range(3):
        step = one_step(step)
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step = one_step(step)
    _synchronize(device)
    return steps / (time.perf_counter() - started)


class RawTowers:
    """The frozen towers up to the store's cached layers, run on a batch's raw inputs (decoded once)."""

    def __init__(self, store_config: dict, shards: Path, batch: dict, device: torch.device):
        from trimodal.features.image import make_image_extractor
        from trimodal.features.text import make_text_extractors
        from trimodal.pipeline.read.index import read_index

        self.device, self.image, self.text, self.audio = device, None, None, None
        index = read_index(shards)
        blobs, wavs = _raw_members(shards, index, batch["keys"])
        image, text, audio = store_config.get("image") or {}, store_config.get("text") or {}, store_config.get("audio") or {}
        if "layer" in image:
            self.image = make_image_extractor(image["encoder"], device, tokens=True, index=index, shards=shards)
            self.pixels = self.image.pixels(blobs).to(device)
        if (text.get("tower") or {}).get("tokens"):
            self.text = make_text_extractors(text["tower"]["encoder"], device, tokens=True)[1]
        if audio and "n_mels" not in audio:
            from trimodal.features.audio import decode_wav
            from trimodal.features.speech import make_speech_extractor

            self.audio = make_speech_extractor(audio["encoder"], device)
            self.waveforms = [self.audio.resample(*decode_wav(wav)) for wav in wavs]

    @torch.no_grad()
    def batch(self, batch: dict) -> dict:
        batch = dict(batch)
        if self.image is not None:
            cut = self.image.cut
            states, context = cut.embed(self.pixels)
            batch["image_tokens"] = cut.run_blocks(states, context, 0, self.image.spec.layer)
        if self.text is not None:
            cut, ids = self.text.cut, batch["text"]
            states, context = cut.embed(ids)
            batch["text_states"] = cut.run_blocks(states, context, 0, self.text.layer)
        if self.audio is not None:
            frames = [self.audio.frames(w) for w in self.waveforms]
            audio = torch.zeros(len(frames), max(len(f) for f in frames), frames[0].shape[1], device=self.device)
            mask = torch.zeros(audio.shape[:2], dtype=torch.bool, device=self.device)
            for row, f in enumerate(frames):
                audio[row, : len(f)], mask[row, : len(f)] = f, True
            batch["audio"], batch["audio_mask"] = audio, mask
        return batch


def _raw_members(shards: Path, index: dict, keys: list[str]) -> tuple[list[bytes], list[bytes]]:
    """The jpg and the first wav of each key, from the training shards."""
    from trimodal.pipeline.read.shards import read_shard

    wanted, images, wavs = set(keys), {}, {}
    for entry in index["splits"]["train"]["shards"]:
        contents = read_shard(shards / entry["name"], images=True, audio=True)
        first = 0
        for key, image, count in zip(contents.keys, contents.images, contents.wav_counts or [0] * len(contents.keys)):
            if key in wanted:
                images[key] = image
                if count:
                    wavs[key] = contents.wavs[first]
            first += count
        if len(images) == len(wanted):
            break
    return [images[k] for k in keys], [wavs[k] for k in keys if k in wavs]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--features", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--flickr8k-images", type=int, default=6000)
    parser.add_argument("--full-towers", action="store_true",
                        help="cman: also time the model with the frozen towers recomputed from raw inputs every step")
    parser.add_argument("--nproc", type=int, default=0,
                        help="also time the full path under torchrun with this many ranks (scaling efficiency)")
    parser.add_argument("--rank-of-many", type=Path, help=argparse.SUPPRESS)  # (d)'s ranks: only run (a)
    parser.add_argument("overrides", nargs="*", help="section.key=value, as for mm train")
    args = parser.parse_args()
    overrides = [f"train.device={args.device}", *args.overrides]
    if args.rank_of_many:
        measured = full_path(args.config, args.shards, args.features, args.epochs, overrides)
        if int(os.environ.get("RANK", "0")) == 0:
            args.rank_of_many.write_text(json.dumps(measured))
        return
    batch_size = load_config(args.config, overrides).train.batch_size

    # Model-only first: it also pays torch's one-time lazy imports (the first optimizer step of a
    # process loads torch's compiler modules, seconds on a CPU) that would otherwise land in (a).
    alone = model_only(args.config, args.shards, args.features, args.steps, overrides)
    measured = full_path(args.config, args.shards, args.features, args.epochs, overrides)
    full, steps = measured["steps_per_s"], measured["steps"]
    epochs_per_hour = 3600 * full / (args.flickr8k_images // batch_size)
    print(f"config: {args.config}, device: {resolve_device(args.device)}, batch {batch_size}, "
          f"{steps} full-path steps, {args.steps} model-only steps")
    print(f"train: {full:.2f} steps/s vs model-only {alone:.2f} steps/s, ratio {full / alone:.2f}")
    print(f"Flickr8k scale ({args.flickr8k_images:,} images, {args.flickr8k_images // batch_size} steps/epoch): "
          f"{epochs_per_hour:.1f} epochs/hour")
    if args.nproc > 1:
        one = full_path_on_ranks(args, overrides, 1)["samples_per_s"]
        many = full_path_on_ranks(args, overrides, args.nproc)["samples_per_s"]
        print(f"ranks: 1 rank {one:.1f} samples/s, {args.nproc} ranks {many:.1f} samples/s, "
              f"scaling efficiency {many / (args.nproc * one):.2f}")
    if args.full_towers:
        towers = model_only(args.config, args.shards, args.features, max(2, args.steps // 10), overrides, towers=True)
        print(f"partial caching: {alone:.2f} steps/s vs full towers {towers:.3f} steps/s, ratio {alone / towers:.1f}")


if __name__ == "__main__":
    main()
