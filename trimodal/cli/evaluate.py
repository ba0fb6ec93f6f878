"""`mm eval RUN [--split test]`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from trimodal.cli.console import Device, console, say
from trimodal.cli.tables import recall_table


def evaluate(
    run: Annotated[Path, typer.Argument(help="A run folder written by `mm train`.")],
    split: Annotated[str, typer.Option("--split", help="Split to evaluate.")] = "test",
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="best or last.")] = "best",
    ttt: Annotated[bool, typer.Option("--ttt", help="Also evaluate with test-time memory updates.")] = False,
    ttt_k: Annotated[int | None, typer.Option("--ttt-k", help="Slots moved per query (default: the model's).")] = None,
    ttt_step: Annotated[float | None, typer.Option("--ttt-step", help="Step toward the query (default: the model's).")] = None,
    shards: Annotated[Path | None, typer.Option("--shards", help="Shards (default: the run's).")] = None,
    features: Annotated[Path | None, typer.Option("--features", help="Feature store (default: the run's).")] = None,
    device: Device = "auto",
) -> None:
    """Recall@1/5/10 and median rank in all six directions; writes RUN/eval-<split>.json.

    Example: mm eval runs/mmn --split test --ttt
    """
    from trimodal.training.eval_run import evaluate_run

    result = evaluate_run(run, split=split, checkpoint=checkpoint, ttt=ttt, shards=shards, features=features,
                          device=device, ttt_k=ttt_k, ttt_step=ttt_step)
    title = f"{split}: {result['images']} images, {result['captions']} captions, {result['utterances']} utterances"
    console.print(recall_table(result["directions"], title=title, ttt=result.get("directions_ttt")))
    say(f"written to {run / f'eval-{split}.json'}")
