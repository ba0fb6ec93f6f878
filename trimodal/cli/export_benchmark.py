"""`mm export-benchmark SHARDS [--split test] [--out DIR]`: CLIP_benchmark's layout over our shards."""

from __future__ import annotations

from typing import Annotated

import typer

from trimodal.cli.console import say


def export_benchmark(
    shards: Annotated[str, typer.Argument(help="A shard folder written by `mm shard` (local).")],
    split: Annotated[list[str], typer.Option("--split", help="Split to lay out (repeatable).")] = ["test"],  # noqa: B006
    out: Annotated[str | None, typer.Option("--out", help="Folder for the layout (default: SHARDS/clip_benchmark).")] = None,
) -> None:
    """Lay out SHARDS' splits as CLIP_benchmark's webdataset retrieval dataset (numbered links to the tars,
    nshards.txt, dataset_type.txt): no tar is copied, and each image's KEY.txt lines are its positives.

    Example: mm export-benchmark shards/coco && clip_benchmark eval --dataset wds/coco --task zeroshot_retrieval
             --dataset_root shards/coco/clip_benchmark --model ViT-B-32 --pretrained openai --recall_k 1 5 10
    """
    from pathlib import Path

    from trimodal.pipeline.shard.benchmark_view import write_benchmark_view

    view = write_benchmark_view(shards, out, tuple(dict.fromkeys(split)))
    for name, tars in view["splits"].items():
        say(f"{name}: {tars} tar(s) linked in {view['root'] / name}")
    name = Path(shards).resolve().name
    say(f"run: clip_benchmark eval --dataset wds/{name} --dataset_root {view['root']} --split "
        f"{next(iter(view['splits']))} --task zeroshot_retrieval --model ViT-B-32 --pretrained openai --recall_k 1 5 10")
