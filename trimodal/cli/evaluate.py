"""`mm eval RUN [--split test]`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from trimodal.cli.console import Device, console, reporter, say
from trimodal.cli.tables import caption_table, recall_table


def evaluate(
    run: Annotated[str | None, typer.Argument(help="A run folder written by `mm train` (or its URL); none with "
                                              "--model.", show_default=False)] = None,
    split: Annotated[str, typer.Option("--split", help="Split to evaluate.")] = "test",
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="best or last.")] = "best",
    folds: Annotated[int | None, typer.Option("--folds", help=(
        "Also score within F consecutive folds of the split's images (as equal as possible, the first ones one "
        "larger) and report the mean; 5 on COCO's 5,000 test images is the 1k protocol. Not applied to --ttt."))] = None,
    ttt: Annotated[bool, typer.Option("--ttt", help="Also evaluate with test-time memory updates.")] = False,
    ttt_k: Annotated[int | None, typer.Option("--ttt-k", help="Slots moved per query (default: the model's).")] = None,
    ttt_step: Annotated[float | None, typer.Option("--ttt-step", help="Step toward the query (default: the model's).")] = None,
    beams: Annotated[int, typer.Option("--beams", min=1, help=(
        "Captioning families: beam width of the generated captions (1 is greedy; 3, as most published "
        "COCO captioning results)."))] = 3,
    shards: Annotated[str | None, typer.Option("--shards", help="Shards (default: the run's).")] = None,
    features: Annotated[str | None, typer.Option("--features", help="Feature store (default: the run's).")] = None,
    model: Annotated[str | None, typer.Option("--model", help=(
        "Instead of a run: a pretrained open_clip:<model>[:<pretrained tag or weights file>] scored zero-shot on "
        "--shards (image↔text, the same protocol), written to --out."))] = None,
    out: Annotated[str | None, typer.Option("--out", help="With --model: folder for eval-<split>.json.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="With --model: images or captions "
                                            "encoded at once.")] = 64,
    device: Device = "auto",
) -> None:
    """Recall@1/5/10 and median rank in all six directions; writes RUN/eval-<split>.json. Families that
    generate captions (bitmar) also get BLEU-1..4, METEOR (with Java), ROUGE-L and CIDEr, and
    RUN/captions-<split>.jsonl.

    Example: mm eval runs/mmn --split test --ttt
    Example: mm eval runs/coco --split test --folds 5
    Example: mm eval --model open_clip:ViT-B-32:openai --shards shards/coco --split test --folds 5 --out runs/clip
    """
    from trimodal.errors import ConfigError
    from trimodal.storage import location
    from trimodal.training.eval_run import evaluate_run

    if model is not None:
        if run is not None:
            raise ConfigError("give a run or --model, not both")
        _evaluate_pretrained(model, split, shards, features, folds, out, batch_size, device,
                             ttt or ttt_k is not None or ttt_step is not None)
        return
    if run is None:
        raise ConfigError("give a run folder (or --model open_clip:<model>[:<weights>] for a zero-shot baseline)")
    if out is not None:
        raise ConfigError("--out goes with --model; a run's evaluation is written into the run")
    run = location(run)
    shards = location(shards) if shards is not None else None
    features = location(features) if features is not None else None

    result = evaluate_run(run, split=split, checkpoint=checkpoint, ttt=ttt, shards=shards, features=features,
                          device=device, ttt_k=ttt_k, ttt_step=ttt_step, folds=folds, beams=beams)
    title = f"{split}: {result['images']} images, {result['captions']} captions, {result['utterances']} utterances"
    console.print(recall_table(result["directions"], title=title, ttt=result.get("directions_ttt")))
    if "directions_1k" in result:
        console.print(recall_table(result["directions_1k"], title=folds_title(split, result["folds"]["images"])))
    if "captioning" in result:
        captioning = result["captioning"]
        console.print(caption_table(captioning, title=f"{split}: captions of {captioning['images']} images, "
                                                      f"beam {captioning['beams']}"))
        say(f"captions in {run / captioning['captions_file']}")
    say(f"written to {run / f'eval-{split}.json'}")


def folds_title(split: str, sizes: list[int]) -> str:
    images = f"{sizes[0]:,}" if min(sizes) == max(sizes) else f"{min(sizes):,}–{max(sizes):,}"
    return f"{split}, mean over {len(sizes)} folds of {images} images"


def _evaluate_pretrained(model: str, split: str, shards: str | None, features: str | None, folds: int | None,
                         out: str | None, batch_size: int, device: str, ttt: bool) -> None:
    from trimodal.errors import ConfigError
    from trimodal.training.zero_shot import PretrainedOptions, evaluate_pretrained

    if shards is None or out is None:
        raise ConfigError("--model needs --shards (the split to score) and --out (where eval-<split>.json goes)")
    if ttt:
        raise ConfigError("--ttt is a run's test-time training; a zero-shot model has none")
    options = PretrainedOptions(split=split, features=features, folds=folds, device=device, batch_size=batch_size)
    with reporter() as progress:
        result = evaluate_pretrained(model, shards, out, options, reporter=progress)
    title = (f"{result['model']} zero-shot, {split}: {result['images']} images, {result['captions']} captions"
             + (" (random init)" if result["random_init"] else ""))
    console.print(recall_table(result["directions"], title=title))
    if "directions_1k" in result:
        console.print(recall_table(result["directions_1k"], title=folds_title(split, result["folds"]["images"])))
    say(f"written to {out.rstrip('/')}/eval-{split}.json")
