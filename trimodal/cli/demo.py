"""`mm demo`: the whole chain on the built-in mini dataset, one short line per step."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from trimodal.cli.console import say
from trimodal.errors import TrimodalError
from trimodal.pipeline.download import download_dataset
from trimodal.pipeline.info import describe_shards
from trimodal.pipeline.shard import ShardOptions, shard_dataset
from trimodal.pipeline.validate import validate_dataset


def demo(
    workdir: Annotated[Path, typer.Option("--workdir", help="Where data, shards and runs go.")] = Path("mm-demo"),
) -> None:
    """Run download mini → validate → shard → info.

    Example: mm demo --workdir mm-demo
    """
    root, shards = workdir / "data", workdir / "shards" / "mini"

    started = time.monotonic()
    result = download_dataset("mini", root)
    say(f"[1/4] download mini: {'already there' if result.already_complete else 'synthesised'} in {root / 'mini'} "
        f"({time.monotonic() - started:.1f} s)")

    started = time.monotonic()
    report = validate_dataset("mini", root, workers=2)
    tally = report.by_severity()
    say(f"[2/4] validate: {report.counts['images_checked']} images and {report.counts['wavs_checked']} wavs checked, "
        f"{tally['error']} error(s) ({time.monotonic() - started:.1f} s)")
    if not report.ok:
        raise TrimodalError(f"the mini dataset did not validate; run `mm validate mini --root {root}`")

    started = time.monotonic()
    shard_dataset("mini", root, shards, ShardOptions(workers=2))
    say(f"[3/4] shard: {shards} ({time.monotonic() - started:.1f} s)")

    summary = describe_shards(shards)
    parts = [f"{split} {row['samples']} samples / {row['shards']} shards" for split, row in summary["splits"].items()]
    say(f"[4/4] info: {', '.join(parts)}; {summary['skipped']} skipped")
