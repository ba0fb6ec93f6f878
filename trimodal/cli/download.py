"""`mm download NAME --root DIR`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from trimodal.cli import datasets
from trimodal.cli.console import Root, console, human_bytes, reporter, say, warn


def download(
    name: Annotated[str, typer.Argument(help=f"Dataset: {datasets.downloadable()}.")],
    root: Root,
    mirror: Annotated[str | None, typer.Option("--mirror", help="Fetch each archive from URL/<archive file name>.")] = None,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip checksum verification (loudly).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Download and extract again even when complete.")] = False,
    keep_archives: Annotated[bool, typer.Option("--keep-archives", help="Keep the archives in ROOT/.downloads/.")] = False,
    only: Annotated[list[str] | None, typer.Option("--only", help="Only these parts (coco: annotations, val, "
                                                   "train; repeat or comma-separate).")] = None,
) -> None:
    """Download, verify and safely extract a dataset into ROOT/NAME/ (resumable; a no-op when complete).

    Example: mm download coco2014 --root data --only annotations,val
    """
    from trimodal.pipeline.download import download_dataset

    parts = [part.strip() for value in only or () for part in value.split(",") if part.strip()] or None
    if no_verify:
        warn("--no-verify: archives will NOT be checked against their published checksums")
    with reporter() as progress:
        result = download_dataset(name, root, mirror=mirror, verify=not no_verify, force=force,
                                  keep_archives=keep_archives, only=parts, reporter=progress)
    if result.already_complete:
        what = f"{name} ({', '.join(parts)})" if parts else name
        say(f"{what} is already complete in {result.target}; nothing to do")
        return
    if result.synthetic:
        say(f"{name}: synthesised into {result.target}")
        return
    table = Table(title=f"{name} → {result.target}")
    for column in ("archive", "size", "checksum", "files extracted", "skipped (__MACOSX, ._*)"):
        table.add_column(column)
    for archive in result.archives:
        checksum = ", ".join(f"{k} ok" for k in archive.digests) if archive.verified else "[yellow]not verified[/yellow]"
        table.add_row(archive.file, human_bytes(archive.bytes), checksum, str(archive.files_extracted),
                      str(archive.skipped_members))
    console.print(table)
