"""`mm caption RUN --image FILE.jpg … | --features STORE --keys KEY …`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from trimodal.cli.console import Device


def caption(
    run: Annotated[Path, typer.Argument(help="A run folder of a captioning family (bitmar) written by `mm train`.")],
    image: Annotated[list[Path] | None, typer.Option("--image", help="An image file to caption (repeatable).")] = None,
    features: Annotated[Path | None, typer.Option("--features", help=(
        "A feature store holding the images named by --keys (default: the run's)."))] = None,
    keys: Annotated[list[str] | None, typer.Option("--keys", help="Image keys in the store (repeatable).")] = None,
    extra_keys: Annotated[list[str] | None, typer.Argument(help="More keys after --keys K.", show_default=False)] = None,
    beams: Annotated[int, typer.Option("--beams", min=1, help="Beam width (1 is greedy).")] = 3,
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="best or last.")] = "best",
    device: Device = "auto",
) -> None:
    """Print generated captions, one line each: the image (file or key), a tab, the caption.

    Example: mm caption runs/bitmar --image photo.jpg
    Example: mm caption runs/bitmar --features features/mini.zarr --keys 3000000000_ab12cd34ef 3000007919_0f1e2d3c4b
    """
    from trimodal.training.caption_run import caption_run

    keys = [*(keys or []), *(extra_keys or [])]
    for name, text in caption_run(run, images=image or [], features=features, keys=keys, beams=beams,
                                  checkpoint=checkpoint, device=device):
        typer.echo(f"{name}\t{text}")  # plain, tab-separated: for pipes as much as for eyes
