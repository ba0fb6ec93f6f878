"""Training speed: `mm train`'s full path against the same model stepping on one batch already on the device.

    python benchmarks/train.py --config configs/nlmm-tiny.toml --shards SHARDS --features STORE.zarr \
        [--epochs 3] [--steps 30] [--device auto] [--flickr8k-images 6000] [section.key=value ...]

(a) full path: `trimodal.training.trainer.train` for `--epochs` epochs into a temporary run folder; its
    steps/s counts only the time inside the training epochs (streaming shards + store through the
    DataLoader, host→device copies, forward, loss, backward, the family's optimizer step(s), logging),
    not validation, checkpoints or plots;
(b) model-only: the same model and optimization built from the same config, one collated batch moved
    to the device once, then `--steps` timed steps (after 3 warm-up steps) of forward, loss, backward
    and optimizer step.

Prints `train: X steps/s vs model-only Y steps/s, ratio Z` and the epochs per hour that (a) gives on
Flickr8k-scale data (`--flickr8k-images` training images, one sample per image per epoch).

For `cman`, `--full-towers` adds (c): the same model on the same batch, but every step first runs the
frozen towers from raw inputs up to the cached layer (under no_grad: image stem + blocks on the batch's
preprocessed pixels, text stem + blocks on its token ids, the speech tower on its 16 kHz waveforms, one
utterance at a time as featurize does) instead of reading those states from the store; the jpg and wav
decoding is done once, before the timing. Prints `partial caching: X steps/s vs full towers Y steps/s,
ratio Z` (model-only (b) is the partial-caching figure).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from trimodal.features.image import resolve_device  # noqa: E402
from trimodal.training.config import load_config  # noqa: E402
from trimodal.training.data import TrimodalDataset, open_sources  # noqa: E402
from trimodal.training.losses import training_loss  # noqa: E402
from trimodal.training.models import model_inputs  # noqa: E402
from trimodal.training.optimization import make_optimization  # noqa: E402
from trimodal.training.trainer import build_from_config, max_audio_frames, train  # noqa: E402


def full_path(config: Path, shards: Path, features: Path, epochs: int, overrides: list[str]) -> tuple[float, int]:
    with tempfile.TemporaryDirectory(prefix="trimodal-bench-train-") as folder:
        result = train(config, shards, features, Path(folder) / "run",
                       overrides=[*overrides, f"train.epochs={epochs}"])
    return result.train_steps / result.train_seconds, result.train_steps


def model_only(config: Path, shards: Path, features: Path, steps: int, overrides: list[str],
               towers: bool = False) -> float:
    """Steps/s of the model alone on one batch on the device; with `towers`, each step first recomputes
    the cached tower states from raw inputs (see the module doc, (c))."""
    run = load_config(config, overrides)
    settings = run.train
    _, store = open_sources(shards, features, "train")
    device = resolve_device(settings.device)
    model, _ = build_from_config(run, store.config)
    model.to(device).train()
    dataset = TrimodalDataset(shards, features, "train", modalities=settings.modalities, batch_size=settings.batch_size,
                              shuffle=True, seed=settings.seed, shuffle_buffer=settings.shuffle_buffer,
                              max_audio_frames=max_audio_frames(settings, store.config), drop_last=True,
                              inputs=model_inputs(model))
    batch = next(iter(dataset))
    raw = RawTowers(store.config, shards, batch, device) if towers else None
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    present = {m: batch[f"{m}_present"] for m in settings.modalities}
    optimization = make_optimization(model, settings, total_steps=10 * steps)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=settings.amp and device.type == "cuda")

    def one_step(step: int) -> int:
        with amp:
            latents = model(raw.batch(batch) if raw else batch)
        loss, _ = training_loss(model, latents, present, settings.loss_weights)
        loss.backward()
        return optimization.step(step, loss)

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
        from trimodal.pipeline.shard import read_index

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
    from trimodal.pipeline.stream import read_shard

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
    parser.add_argument("overrides", nargs="*", help="section.key=value, as for mm train")
    args = parser.parse_args()
    overrides = [f"train.device={args.device}", *args.overrides]
    batch_size = load_config(args.config, overrides).train.batch_size

    # Model-only first: it also pays torch's one-time lazy imports (the first optimizer step of a
    # process loads torch's compiler modules, seconds on a CPU) that would otherwise land in (a).
    alone = model_only(args.config, args.shards, args.features, args.steps, overrides)
    full, steps = full_path(args.config, args.shards, args.features, args.epochs, overrides)
    epochs_per_hour = 3600 * full / (args.flickr8k_images // batch_size)
    print(f"config: {args.config}, device: {resolve_device(args.device)}, batch {batch_size}, "
          f"{steps} full-path steps, {args.steps} model-only steps")
    print(f"train: {full:.2f} steps/s vs model-only {alone:.2f} steps/s, ratio {full / alone:.2f}")
    print(f"Flickr8k scale ({args.flickr8k_images:,} images, {args.flickr8k_images // batch_size} steps/epoch): "
          f"{epochs_per_hour:.1f} epochs/hour")
    if args.full_towers:
        towers = model_only(args.config, args.shards, args.features, max(2, args.steps // 10), overrides, towers=True)
        print(f"partial caching: {alone:.2f} steps/s vs full towers {towers:.3f} steps/s, ratio {alone / towers:.1f}")


if __name__ == "__main__":
    main()
