"""`mm info PATH`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from trimodal.cli.console import AsJson, console, human_bytes, warn


def info(
    path: Annotated[str, typer.Argument(help="A shard folder (or its URL) or a raw dataset root.")],
    as_json: AsJson = False,
) -> None:
    """Summarise a shard folder (splits, samples, shards, bytes) or what a dataset root holds.

    Example: mm info shards/flickr8k
    """
    from trimodal.pipeline.info import describe

    from trimodal.storage import location

    path = location(path)
    summary = describe(path)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    if summary["kind"] == "shards":
        table = Table(title=f"{summary['dataset']} shards in {path} ({', '.join(summary['modalities'])})")
        for column in ("split", "samples", "captions", "utterances", "shards", "size"):
            table.add_column(column, justify="right" if column != "split" else "left")
        for split, row in summary["splits"].items():
            table.add_row(split, f"{row['samples']:,}", f"{row['captions']:,}", f"{row['utterances']:,}",
                          str(row["shards"]), human_bytes(row["bytes"]))
        console.print(table)
        console.print(f"skipped items: {summary['skipped']}")
        if summary["missing_or_changed_shards"]:
            warn(f"missing or changed shards: {', '.join(summary['missing_or_changed_shards'])}")
        return
    table = Table(title=f"datasets under {path}")
    for column in ("dataset", "status", "files", "size", "verified"):
        table.add_column(column)
    for row in summary["datasets"]:
        status = {"complete": "[green]complete[/green]",
                  "partial": f"[yellow]partial: {', '.join(row['parts'])}[/yellow]"}.get(row["status"], "[yellow]incomplete[/yellow]")
        table.add_row(row["name"], status, f"{row['files']:,}", human_bytes(row["bytes"]), "yes" if row["verified"] else "no")
    console.print(table)
    if summary["partial_downloads"]:
        console.print(f"partial downloads (resumable): {', '.join(summary['partial_downloads'])}")
