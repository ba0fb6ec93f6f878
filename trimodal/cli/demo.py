"""`mm demo`: the whole chain on the built-in mini dataset, one short line per step, ending with the table."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from trimodal.cli.console import Device, console, reporter, say
from trimodal.cli.tables import recall_table
from trimodal.errors import TrimodalError

STEPS = 6


def demo(
    workdir: Annotated[Path, typer.Option("--workdir", help="Where data, shards, features and runs go.")] = Path("mm-demo"),
    device: Device = "auto",
) -> None:
    """Run download mini → validate → shard → featurize → train (mmn-tiny) → eval on the test split.

    Example: mm demo --workdir mm-demo
    """
    from trimodal.features.featurize import FeaturizeOptions, featurize
    from trimodal.features.store import StaleCacheError
    from trimodal.pipeline.datasets import download_dataset
    from trimodal.pipeline.shard.writer import ShardOptions
    from trimodal.pipeline.datasets import shard_dataset
    from trimodal.pipeline.datasets import validate_dataset
    from trimodal.training.config import shipped_config
    from trimodal.training.eval_run import evaluate_run
    from trimodal.training.trainer import train

    root, shards = workdir / "data", workdir / "shards" / "mini"
    features, run = workdir / "features" / "mini.zarr", workdir / "runs" / "mmn-tiny"
    clock = _Clock()

    result = download_dataset("mini", root)
    clock.step(1, f"download mini: {'already there' if result.already_complete else 'synthesised'} in {root / 'mini'}")

    report = validate_dataset("mini", root, workers=2)
    tally = report.by_severity()
    clock.step(2, f"validate: {report.counts['images_checked']} images and {report.counts['wavs_checked']} wavs "
                  f"checked, {tally['error']} error(s)")
    if not report.ok:
        raise TrimodalError(f"the mini dataset did not validate; run `mm validate mini --root {root}`")

    index = shard_dataset("mini", root, shards, ShardOptions(workers=2))
    parts = [f"{split} {info['samples']}" for split, info in index["splits"].items()]
    clock.step(3, f"shard: {', '.join(parts)} samples in {sum(len(i['shards']) for i in index['splits'].values())} "
                  f"shards under {shards}")

    with reporter(transient=True, plain=False) as progress:
        try:
            summary = featurize(shards, features, FeaturizeOptions(device=device), reporter=progress)
        except StaleCacheError as stale:  # left by another trimodal version or other settings: redo it
            say(f"      {stale}; recomputing")
            summary = featurize(shards, features, FeaturizeOptions(device=device, overwrite=True), reporter=progress)
    clock.step(4, f"featurize: {summary.rows} images ({'random-init ' if summary.random_init else ''}ViT-B-32), "
                  f"{summary.captions} captions, {summary.utterances} utterances on {summary.device} → {features}")

    with reporter(transient=True, plain=False) as progress:
        trained = train(shipped_config("mmn-tiny"), shards, features, run, overwrite=True, reporter=progress,
                        overrides=[f'train.device="{device}"'])
    clock.step(5, f"train mmn-tiny: {trained.parameters:,} parameters, {trained.epochs_run} epochs on "
                  f"{trained.device} → {run}")

    evaluation = evaluate_run(run, split="test", device=device)
    clock.step(6, f"eval: {evaluation['images']} test images, {evaluation['captions']} captions, "
                  f"{evaluation['utterances']} utterances → {run / 'eval-test.json'}")
    console.print(recall_table(evaluation["directions"], title="mini test split, mmn-tiny (best checkpoint)"))
    above = [d for d, m in evaluation["directions"].items() if m["R@10"] >= 3 * m["chance@10"]]
    say(f"{len(above)} of {len(evaluation['directions'])} directions reach R@10 ≥ 3 × chance; "
        f"total {clock.total():.0f} s; plots in {run / 'plots'}")


class _Clock:
    def __init__(self):
        self.started = self.last = time.monotonic()

    def step(self, number: int, message: str) -> None:
        now = time.monotonic()
        say(f"[{number}/{STEPS}] {message} ({now - self.last:.1f} s)")
        self.last = now

    def total(self) -> float:
        return time.monotonic() - self.started
