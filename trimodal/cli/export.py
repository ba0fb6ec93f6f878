"""`mm export RUN --format onnx --out DIR`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from trimodal.cli.console import console, reporter, say, warn


def export(
    run: Annotated[str, typer.Argument(help="A run folder written by `mm train` (or its URL).")],
    out: Annotated[str, typer.Option("--out", help="Folder for the graphs and export.json.")],
    format: Annotated[str, typer.Option("--format", help="onnx (the one format so far).")] = "onnx",
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="best or last.")] = "best",
    split: Annotated[str, typer.Option("--split", help="Split whose rows every graph is checked on against torch.")] = "test",
    shards: Annotated[str | None, typer.Option("--shards", help="Shards (default: the run's).")] = None,
    features: Annotated[str | None, typer.Option("--features", help="Feature store (default: the run's).")] = None,
) -> None:
    """Export each encoder of a run (image, text, speech: from the feature store's inputs to the latents) as
    an ONNX graph with dynamic batch and sequence axes, checked against torch on the split's rows, and
    export.json naming inputs, outputs and the preprocessing they expect. `mm index --onnx` and
    `mm search --onnx` then encode on onnxruntime alone.

    Example: mm export runs/mmn --format onnx --out runs/mmn/onnx
    """
    from trimodal.export.graphs import ExportOptions, export_run

    options = ExportOptions(format=format, checkpoint=checkpoint, split=split, shards=shards, features=features)
    with reporter() as progress:
        manifest = export_run(run, out, options, reporter=progress)
    table = Table(title=f"{manifest['run']} ({manifest['checkpoint']}) → ONNX opset {manifest['opset']}")
    for column in ("encoder", "inputs", "output", "max |Δ| vs torch", "rows checked"):
        table.add_column(column, justify="right" if column in ("max |Δ| vs torch", "rows checked") else "left")
    for modality, graph in manifest["encoders"].items():
        inputs = ", ".join(f"{i['name']} {i['dtype']}[{', '.join(map(str, i['shape']))}]" for i in graph["inputs"])
        parity = graph["parity"]
        beyond = f" ({parity['rows_beyond_tolerance']} past {parity['tolerance']:g})" if parity["rows_beyond_tolerance"] else ""
        table.add_row(modality, escape(inputs), f"latent float32[batch, {graph['output']['shape'][1]}]",
                      f"{parity['max_abs_diff']:.2g}{beyond}", str(parity["rows"]))
    console.print(table)
    for line in manifest["not_exported"]:
        warn(line)
    say(f"written: {out}  (index with it: mm index {run} --onnx {out})")
