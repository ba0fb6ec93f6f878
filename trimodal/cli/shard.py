"""`mm shard NAME --root DIR --out OUT`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from trimodal.cli import datasets
from trimodal.cli.console import JsonlManifest, SourceRoot, Splits, Workers, console, human_bytes, reporter, warn


def shard(
    name: Annotated[str, typer.Argument(help=f"Dataset: {datasets.readable()}; {datasets.joined()} are "
                                             "added when downloaded under the same --root.")],
    out: Annotated[str, typer.Option("--out", help="Output folder for <split>-%06d.tar and index.json (or an "
                                                       "s3://, gs:// URL).")],
    root: SourceRoot = None,
    max_samples: Annotated[int, typer.Option("--max-samples", help="At most this many samples per shard.")] = 1000,
    max_mb: Annotated[float, typer.Option("--max-mb", help="At most this many MB per shard.")] = 500.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the training split's sample order.")] = 0,
    workers: Workers = 2,
    max_bad: Annotated[float, typer.Option("--max-bad", help="Fail when more than this fraction of samples "
                                           "or utterances is bad.")] = 0.001,
    splits: Splits = None,
    manifest: JsonlManifest = None,
    val_fraction: Annotated[float | None, typer.Option("--val-fraction", help="babylm-mm: share of rows drawn "
                                                       "into val (default 0.01).")] = None,
    test_fraction: Annotated[float | None, typer.Option("--test-fraction", help="babylm-mm: share of rows drawn "
                                                        "into test (default 0.01).")] = None,
) -> None:
    """Write deterministic, resumable webdataset shards: one sample per image with all its captions.

    cc3m and img2dataset (any img2dataset webdataset output folder) adopt the tars img2dataset wrote
    (linked, not copied); babylm-mm writes text-only samples whose image vectors featurize imports.

    Example: mm shard flickr8k --root data --out shards/flickr8k --workers 2
    """
    from trimodal.pipeline.shard.writer import ShardOptions
    from trimodal.pipeline.datasets import shard_dataset

    from trimodal.storage import location

    out = location(out)
    options = ShardOptions(max_samples=max_samples, max_mb=max_mb, seed=seed, max_bad=max_bad, workers=workers)
    with reporter() as progress:
        index = shard_dataset(name, root, out, options, reporter=progress,
                              source_options={"splits": splits, "manifest": manifest,
                                              "val_fraction": val_fraction, "test_fraction": test_fraction})
    spoken = datasets.joining(name)
    if "audio" not in index["modalities"] and (spoken or datasets.speaks(name)):
        warn(f"no spoken captions found for {name}" +
             (f" (download {spoken} into the same --root to add them)" if spoken else ""))
    table = Table(title=f"{name} → {out}")
    for column in ("split", "samples", "captions", "utterances", "shards", "size"):
        table.add_column(column, justify="right" if column != "split" else "left")
    for split, info in index["splits"].items():
        table.add_row(split, f"{info['samples']:,}", f"{info['captions']:,}", f"{info['utterances']:,}",
                      str(len(info["shards"])), human_bytes(sum(s["bytes"] for s in info["shards"])))
    console.print(table)
    if index["skipped"]:
        warn(f"{len(index['skipped'])} item(s) skipped; listed under 'skipped' in {out / 'index.json'}")
