"""`mm pairs SHARD.tar …`: a shard streamed to stdout as one (image, caption) sample per caption."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from trimodal.cli.console import warn


def pairs(
    shards: Annotated[list[str], typer.Argument(metavar="SHARD.tar...", help="Shards (tars) of `mm shard`, local or "
                                                "URLs.")],
) -> None:
    """Write SHARD's samples to stdout as a webdataset tar with one (image, caption) sample per caption, for
    loaders that read one caption per sample, such as open_clip_train, through webdataset's pipe: URLs.
    Nothing is copied to disk; stdout must not be a terminal.

    Example: python -m open_clip_train.main --dataset-type webdataset
             --train-data 'pipe:mm pairs shards/coco/train-{000000..000082}.tar' --train-num-samples 414113 …
    """
    from trimodal.errors import ConfigError
    from trimodal.pipeline.read.pairs import write_pairs
    from trimodal.storage import location

    if sys.stdout.isatty():
        raise ConfigError("mm pairs writes a tar to stdout: pipe it (webdataset's pipe: URL) or redirect it to a file")
    stream = sys.stdout.buffer
    try:
        for shard in shards:
            count = write_pairs(location(shard), stream)
            if count.without_image or count.without_caption:
                warn(f"{shard}: {count.without_image} sample(s) without an image and {count.without_caption} without "
                     f"a caption gave no pair ({count.pairs} pairs of {count.images} samples)")
        stream.flush()
    except BrokenPipeError:
        # The reader stopped early (an epoch's samples taken): as `head` would, end quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
