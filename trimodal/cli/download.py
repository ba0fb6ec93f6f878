"""`mm download NAME --root DIR`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from trimodal.cli import datasets
from trimodal.cli.console import Root, console, human_bytes, reporter, say, warn

_REASONS_SHOWN = 4


def download(
    name: Annotated[str, typer.Argument(help=f"Dataset: {datasets.downloadable()}.")],
    root: Root,
    mirror: Annotated[str | None, typer.Option("--mirror", help="Fetch each archive from URL/<archive file name>.")] = None,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip checksum verification (loudly).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Download and extract again even when complete.")] = False,
    keep_archives: Annotated[bool, typer.Option("--keep-archives", help="Keep the archives in ROOT/.downloads/.")] = False,
    only: Annotated[list[str] | None, typer.Option("--only", "--part", help="Only these parts (coco: annotations, "
                                                   "val, train; babylm-mm: cc3m, localized-narratives; repeat "
                                                   "or comma-separate).")] = None,
    processes: Annotated[int | None, typer.Option("--processes", min=1, help="cc3m: img2dataset processes "
                                                  "(default: CPU cores, at most 16).")] = None,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="cc3m: download threads per process "
                                                "(default 64).")] = None,
    image_size: Annotated[int | None, typer.Option("--image-size", min=1, help="cc3m: images are resized to fit "
                                                   "this many pixels and padded square (default 256).")] = None,
    max_samples: Annotated[int | None, typer.Option("--max-samples", min=1, help="cc3m: only the first N rows of "
                                                    "each split's URL list (to try it out).")] = None,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="cc3m: try the URLs that failed again, into "
                                               "new shards.")] = False,
    retries: Annotated[int | None, typer.Option("--retries", min=1, help="cc3m, with --retry-failed: tries per URL "
                                                "in all, the first included (default 3).")] = None,
    distributor: Annotated[str | None, typer.Option("--distributor", help="cc3m: img2dataset's own distributor: "
                                                    "multiprocessing (default, this machine), ray (the cluster at "
                                                    "RAY_ADDRESS, else a local one) or pyspark (the active Spark "
                                                    "session, else a local one; needs Java).")] = None,
) -> None:
    """Download, verify and safely extract a dataset into ROOT/NAME/ (resumable; a no-op when complete).

    cc3m then downloads its images with img2dataset into ROOT/cc3m/train/ and val/ (resumable too).

    Example: mm download coco2014 --root data --only annotations,val
    """
    from trimodal.pipeline.datasets import download_dataset

    parts = [part.strip() for value in only or () for part in value.split(",") if part.strip()] or None
    options = {"processes": processes, "threads": threads, "image_size": image_size, "max_samples": max_samples,
               "retry_failed": retry_failed or None, "retries": retries, "distributor": distributor}
    if no_verify:
        warn("--no-verify: archives will NOT be checked against their published checksums")
    with reporter() as progress:
        result = download_dataset(name, root, mirror=mirror, verify=not no_verify, force=force,
                                  keep_archives=keep_archives, only=parts, reporter=progress,
                                  download_options={key: value for key, value in options.items() if value is not None})
    if result.already_complete and retry_failed and result.step:
        say(f"{name}: nothing to retry (every URL is downloaded or has had its --retries tries)")
        console.print(_step_table(name, result.step))
        return
    if result.already_complete:
        what = f"{name} ({', '.join(parts)})" if parts else name
        say(f"{what} is already complete in {result.target}; nothing to do")
        return
    if result.synthetic:
        say(f"{name}: synthesised into {result.target}")
        return
    table = Table(title=f"{name} → {result.target}")
    for column in ("file", "size", "checksum", "files extracted", "skipped (__MACOSX, ._*)"):
        table.add_column(column)
    for archive in result.archives:
        checksum = ", ".join(f"{k} ok" for k in archive.digests) if archive.verified else "[yellow]not verified[/yellow]"
        extracted = "– (kept as it is)" if archive.plain else str(archive.files_extracted)
        table.add_row(archive.file, human_bytes(archive.bytes), checksum, extracted,
                      "–" if archive.plain else str(archive.skipped_members))
    console.print(table)
    if result.step and result.step.get("splits"):
        console.print(_step_table(name, result.step))


def _step_table(name: str, step: dict) -> Table:
    """The URL download step (img2dataset) per split: URLs, downloaded, failures by reason, and what a retry changed."""
    retried = any("retry" in split for split in step["splits"].values())
    table = Table(title=f"{name} images (img2dataset)", caption=f"img2dataset's log: {step.get('log', '?')}")
    table.add_column("split")
    for column in ("URLs", "downloaded", "failed") + (("retried", "before → after") if retried else ()):
        table.add_column(column, justify="right")
    table.add_column("failures by reason")
    for split, info in step["splits"].items():
        rate = f" ({info['downloaded'] / info['rows']:.1%})" if info["rows"] else ""
        reasons = [f"{reason['count']:,} × {reason['message'] or '(no message)'}"
                   + (" (resize)" if reason["status"] == "failed_to_resize" else "")
                   for reason in info["reasons"][:_REASONS_SHOWN]]
        if len(info["reasons"]) > _REASONS_SHOWN:
            reasons.append(f"… {len(info['reasons']) - _REASONS_SHOWN} more (mm validate {name} lists them)")
        row = [split, f"{info['rows']:,}", f"{info['downloaded']:,}{rate}", f"{info['failed']:,}"]
        if retried:
            retry = info.get("retry", {})
            exhausted = f" ({retry['exhausted']:,} out of tries)" if retry.get("exhausted") else ""
            row += [f"{retry.get('queued', 0):,}{exhausted}",
                    f"{retry.get('downloaded_before', info['downloaded']):,} → "
                    f"{retry.get('downloaded_after', info['downloaded']):,}"]
        table.add_row(*row, escape("\n".join(reasons)) or "–")
    return table
