"""Recall and captioning tables, shared by `mm train`, `mm eval` and `mm demo`."""

from __future__ import annotations

from rich.table import Table


def recall_table(directions: dict, *, title: str, ttt: dict | None = None) -> Table:
    table = Table(title=title)
    table.add_column("direction")
    for column in ("R@1", "R@5", "R@10", "median rank", "chance@10"):
        table.add_column(column, justify="right")
    if ttt:
        for column in ("TTT R@1", "TTT R@10"):
            table.add_column(column, justify="right", style="cyan")
    for name, metrics in directions.items():
        row = [name, *(f"{metrics[k]:.3f}" for k in ("R@1", "R@5", "R@10")), f"{metrics['median_rank']:g}",
               f"{metrics['chance@10']:.3f}"]
        if ttt:
            row += [f"{ttt[name][k]:.3f}" if name in ttt else "–" for k in ("R@1", "R@10")]
        table.add_row(*row)
    return table


def caption_table(captioning: dict, *, title: str) -> Table:
    metrics = [k for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr") if k in captioning]
    table = Table(title=title)
    for column in metrics:
        table.add_column(column, justify="right")
    table.add_row(*(f"{captioning[k]:.3f}" for k in metrics))
    return table
