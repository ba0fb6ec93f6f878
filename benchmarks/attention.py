"""What recording attention heads costs a training step: `train.attention_every` against none, in one run.

    python benchmarks/attention.py --shards SHARDS --features STORE.zarr [--configs configs/mmn-tiny.toml …]
        [--steps 60] [--every 10] [--device auto]

For each config: the model and its optimization built from the config, one training batch moved to the
device once, then `--steps` timed steps of forward, loss, backward and optimizer step (after 3 warm-up
steps), once alone and once with the attention probe (`trimodal.training.attention_heads`) run every
`--every` steps on `PROBE_ROWS` validation rows, as `mm train` runs it. Prints per config
`<family>: X ms a step, probe Y ms, every N steps: Z% of a step`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from trimodal.distributed import resolve_device  # noqa: E402
from trimodal.training.attention_heads import PROBE_ROWS, AttentionProbe  # noqa: E402
from trimodal.training.config import load_config  # noqa: E402
from trimodal.training.data import TrimodalDataset, open_sources  # noqa: E402
from trimodal.training.trainer import (StepLoss, build_from_config, enter_stage, max_audio_frames,  # noqa: E402
                                       stage_weights)


def measure(config: Path, shards: Path, features: Path, steps: int, every: int, device_name: str) -> dict:
    run = load_config(config, [f'train.device="{device_name}"'])
    settings = run.train
    sources = open_sources(shards, features, ["train", settings.val_split])
    device = resolve_device(settings.device)
    torch.manual_seed(0)
    model, _ = build_from_config(run, sources.store.config)
    model.to(device).train()
    frames = max_audio_frames(settings, sources.store.config)

    def first_batch(split: str, rows: int) -> dict:
        dataset = TrimodalDataset(sources, split=split, modalities=settings.modalities, batch_size=rows, shuffle=False,
                                  max_audio_frames=frames, inputs=model.store_inputs())
        return next(iter(dataset))

    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in first_batch("train", settings.batch_size).items()}
    probe = AttentionProbe(first_batch(settings.val_split, PROBE_ROWS), every)
    weights = stage_weights(settings, enter_stage(model, settings, 0))
    optimization = model.make_optimization(settings, total_steps=10 * steps)
    step_loss = StepLoss(model, settings.modalities, settings.amp)
    state = {"step": 0}

    def one_step(probing: bool) -> None:
        loss, _ = step_loss(batch, weights)
        loss.backward()
        state["step"] = optimization.step(state["step"], loss)
        model.after_optimizer_step()
        if probing and probe.due(state["step"]):
            probe(model, 0, state["step"])

    def timed(probing: bool) -> float:
        for _ in range(3):
            one_step(probing)
        _synchronize(device)
        started = time.perf_counter()
        for _ in range(steps):
            one_step(probing)
        _synchronize(device)
        return (time.perf_counter() - started) / steps

    plain, probed = timed(False), timed(True)
    started = time.perf_counter()
    probe(model, 0, 0)
    _synchronize(device)
    one_probe = time.perf_counter() - started
    return {"family": run.model_name, "step_ms": 1000 * plain, "probed_step_ms": 1000 * probed,
            "probe_ms": 1000 * one_probe, "cost": probed / plain - 1}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--features", type=Path, required=True)
    parser.add_argument("--configs", type=Path, nargs="+", default=[Path("configs/mmn-tiny.toml")])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    for config in args.configs:
        result = measure(config, args.shards, args.features, args.steps, args.every, args.device)
        print(f"{result['family']}: {result['step_ms']:.1f} ms a step, probe {result['probe_ms']:.1f} ms, every "
              f"{args.every} steps: {100 * result['cost']:.1f}% of a step "
              f"({result['probed_step_ms']:.1f} ms a step with it)", flush=True)


if __name__ == "__main__":
    main()
