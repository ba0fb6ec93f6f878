"""`mm featurize SHARDS --out STORE.zarr`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from trimodal.cli.console import Device, Workers, console, reporter, say, warn


def featurize(
    shards: Annotated[str, typer.Argument(help="Shard folder written by `mm shard` (with index.json), or its "
                                                 "s3://, gs:// URL.")],
    out: Annotated[str, typer.Option("--out", help="The zarr feature store to write (a folder or a URL).")],
    audio: Annotated[str, typer.Option("--audio", help=(
        "Audio features: mel80 (log-mels); torchaudio:<HUBERT_BASE|WAV2VEC2_BASE|WAVLM_BASE>[:<weights file>|"
        ":pretrained][:layer=N] (a speech tower's frame states after layer N, default the last); or none."))] = "mel80",
    image: Annotated[str, typer.Option("--image", help=(
        "auto (open_clip:ViT-B-32 when the shards hold images, precomputed when they ship image vectors, else "
        "none); open_clip:<model>[:<pretrained tag or local weights file>]; "
        "timm:<model>[:<local weights file or timm tag>] (e.g. timm:vit_base_patch14_dinov2, stored as DINOv2's "
        "normed CLS token); precomputed (the vectors the dataset ships, e.g. babylm-mm); or none. A tower takes "
        ":layer=L (with --image-tokens: the states after block L, for models that run the rest themselves)."))] = "auto",
    image_tokens: Annotated[bool, typer.Option("--image-tokens", help="Also store the image tower's patch tokens.")] = False,
    text: Annotated[str, typer.Option("--text", help=(
        "auto (ViT-B-32's tokenizer ids); open_clip:<model>[:<pretrained tag or weights file>][:layer=L] (that "
        "model's ids and its text tower's caption embedding); or none."))] = "auto",
    text_tokens: Annotated[bool, typer.Option("--text-tokens", help=(
        "Also store the text tower's token states (after block L with :layer=L)."))] = False,
    splits: Annotated[str | None, typer.Option("--splits", help="Comma-separated splits (default: all).")] = None,
    device: Device = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images / utterances per batch.")] = 64,
    workers: Workers = 2,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Recompute into an existing store.")] = False,
) -> None:
    """Compute log-mels (or speech-tower frames), image embeddings and caption tokens (and text-tower embeddings)
    once, into zarr (resumable per shard).

    Example: mm featurize shards/flickr8k --out features/flickr8k.zarr

    On several GPUs: torchrun --nproc-per-node 8 -m trimodal featurize SHARDS --out STORE (each rank computes its
    share of the shards; the store is the one a single process writes).
    """
    from trimodal.features.featurize import FeaturizeOptions
    from trimodal.features.featurize import featurize as run_featurize

    from trimodal.storage import location

    shards, out = location(shards), location(out)
    options = FeaturizeOptions(
        audio=None if audio == "none" else audio, image=None if image == "none" else image,
        image_tokens=image_tokens, text=None if text == "none" else text, text_tokens=text_tokens,
        splits=tuple(s.strip() for s in splits.split(",")) if splits else None,
        device=device, batch_size=batch_size, workers=workers, overwrite=overwrite)
    with reporter() as progress:
        summary = run_featurize(shards, out, options, reporter=progress)
    for tower in summary.random_towers:
        warn(f"the {tower} runs with RANDOM weights (no pretrained weights named); the store records "
             "random_init = true")
    table = Table(title=f"features → {out} (device {summary.device})")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("shards written / already complete", f"{len(summary.shards_written)} / {len(summary.shards_skipped)}")
    if summary.parts_reused:
        table.add_row("of them computed by an interrupted run", f"{len(summary.parts_reused)}")
    table.add_row("image rows", f"{summary.rows:,}")
    if summary.config.get("image"):
        table.add_row("image embedding", f"{summary.config['image']['model']} → {summary.config['image']['embed_dim']}-d"
                      + (" + patch tokens" if summary.config["image"]["tokens"] else "")
                      + (f" (states after block {summary.config['image']['layer']})" if "layer" in summary.config["image"] else ""))
    if summary.config.get("text"):
        table.add_row("captions tokenised", f"{summary.captions:,}")
        tower = summary.config["text"].get("tower")
        if tower:
            table.add_row("text embedding", f"{tower['model']} → {tower['embed_dim']}-d"
                          + (f" + token states after block {tower['layer']}" if tower["tokens"] else ""))
    if summary.config.get("audio"):
        kind = "mel" if "n_mels" in summary.config["audio"] else f"{summary.config['audio']['model']} layer-{summary.config['audio']['layer']}"
        table.add_row(f"utterances / {kind} frames", f"{summary.utterances:,} / {summary.frames:,}")
    console.print(table)
    say(f"splits: {', '.join(summary.config['splits'])}")
