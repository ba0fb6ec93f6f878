"""`mm validate NAME --root DIR`."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from trimodal.cli import datasets
from trimodal.cli.console import JsonlManifest, SourceRoot, Splits, Workers, console, reporter

_STYLE = {"error": "red", "warning": "yellow", "info": "cyan"}


def validate(
    name: Annotated[str, typer.Argument(help=f"Dataset to check: {datasets.readable()}; "
                                             f"{datasets.joined()} are checked with the dataset they join.")],
    root: SourceRoot = None,
    report: Annotated[Path | None, typer.Option("--report", help="Also write the findings as JSON.")] = None,
    workers: Workers = 2,
    splits: Splits = None,
    manifest: JsonlManifest = None,
) -> None:
    """Find every missing, corrupt or unmatched file; exit 1 when there is any error.

    Example: mm validate flickr8k --root data --report validate.json
    """
    from trimodal.pipeline.datasets import validate_dataset

    with reporter() as progress:
        result = validate_dataset(name, root, workers=workers, reporter=progress,
                                  source_options={"splits": splits, "manifest": manifest})
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")

    counts = Table(title=f"{name} under {result.root}")
    counts.add_column("count")
    counts.add_column("value", justify="right")
    for key, value in result.counts.items():
        counts.add_row(key, f"{value:,}")
    console.print(counts)

    groups = defaultdict(list)
    for problem in result.problems:
        groups[(problem.severity, problem.kind)].append(problem)
    if groups:
        table = Table(title="problems")
        for column in ("severity", "kind", "count", "examples"):
            table.add_column(column)
        for (severity, kind), problems in groups.items():
            examples = [f"{p.file}{':' + str(p.line) if p.line else ''} {p.detail}" for p in problems[:3]]
            table.add_row(f"[{_STYLE[severity]}]{severity}[/]", kind, f"{sum(p.count for p in problems):,}",
                          escape("\n".join(examples)))
        console.print(table)
    tally = result.by_severity()
    summary = f"{tally['error']} error(s), {tally['warning']} warning(s), {tally['info']} note(s)"
    if result.ok:
        console.print(f"[green]ok[/green]: {summary}")
        return
    console.print(f"[red]failed[/red]: {summary}")
    raise typer.Exit(1)
