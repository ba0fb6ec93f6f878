"""`mm train CONFIG --shards S --features F --out RUN`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from trimodal.cli.console import console, reporter, say, warn
from trimodal.cli.tables import recall_table
from trimodal.signals import RESUMABLE_EXIT


def train(
    config: Annotated[Path, typer.Argument(help="A TOML run config, e.g. configs/mmn-tiny.toml.")],
    shards: Annotated[str, typer.Option("--shards", help="Shard folder (index.json), or its s3://, gs:// URL.")],
    features: Annotated[str, typer.Option("--features", help="Feature store written by `mm featurize` (or a URL).")],
    out: Annotated[str, typer.Option("--out", help="Run folder: checkpoints, metrics, plots (or a URL).")],
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in OUT from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty OUT.")] = False,
    time_limit: Annotated[str | None, typer.Option(
        "--time-limit", help="Stop with a checkpoint before this much wall-clock time has passed, e.g. 90m, 4h, "
                             "1:30:00 or 2-00:00:00 (as SLURM writes it); sets train.max_minutes.")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="section.key=value overrides, e.g. train.epochs=5.")] = None,
) -> None:
    """Train a retrieval model on the streamed shards + cached features.

    Model families ([model] name): mmn (Multimodal Memory Network), nlmm (Nested-Learning model with a
    Continuum Memory System and per-level optimizers), dualloop (fusion network with a learned
    learning-rate controller), cman (frozen pretrained towers with LoRA, a fusion transformer, max-margin
    loss; its configs' first line names the featurize options it needs), bitmar (BitNet b1.58 text encoder
    and caption decoder, Larimar episodic memory, trained in [[train.stages]]). Shipped configs:
    configs/<family>-tiny.toml, configs/<family>-flickr8k.toml.

    Example: mm train configs/mmn-tiny.toml --shards shards/mini --features features/mini.zarr --out runs/tiny train.epochs=5

    On several GPUs or nodes, the same command under torchrun (or srun): torchrun --nproc-per-node 8 -m trimodal
    train CONFIG --shards S --features F --out RUN. train.batch_size is the global batch.

    SIGTERM, SIGUSR1, a first Ctrl-C or --time-limit: every rank finishes its step, a checkpoint with the exact
    data position is written, and mm exits with status 75; --resume continues exactly there. A second Ctrl-C
    stops at once (the previous checkpoint stays whole).
    """
    from trimodal.storage import location
    from trimodal.training.stopping import parse_time_limit
    from trimodal.training.trainer import train as run_train

    minutes = parse_time_limit(time_limit) if time_limit is not None else None
    shards, features, out = location(shards), location(features), location(out)
    with reporter() as progress:
        result = run_train(config, shards, features, out, resume=resume, overwrite=overwrite,
                           overrides=overrides or [], reporter=progress, on_start=_say_start, time_limit=minutes)
    if result.stopped:
        from trimodal.distributed import launched_rank

        if launched_rank() > 0:  # rank 0 says it for all
            raise typer.Exit(RESUMABLE_EXIT)
        stop = result.stopped
        where = (f"at step {stop.step}, batch {stop.batch}/{stop.batches} of epoch {stop.epoch + 1}" if stop.batch
                 else f"at step {stop.step}, before epoch {stop.epoch + 1}")
        warn(f"stopped by {stop.reason} {where}; checkpoint in {out / 'checkpoints'}. Resume with: "
             f"{resume_command(config, shards, features, out, overrides or [], time_limit)}")
        raise typer.Exit(RESUMABLE_EXIT)
    say(_parameters_line(result.parameters, result.trainable_parameters, result.device, trained=True))
    if result.last_val:
        console.print(recall_table(result.last_val["directions"], title=f"validation, last epoch ({out})"))
    if result.best_mean_recall is not None:
        say(f"best epoch: {result.best_epoch + 1} (mean recall {result.best_mean_recall:.3f}); "
            f"checkpoints in {out / 'checkpoints'}, plots in {out / 'plots'}")
    else:
        say(f"no validation split in the store: best = last; checkpoints in {out / 'checkpoints'}")


def resume_command(config: Path, shards: Path, features: Path, out: Path, overrides: list[str],
                   time_limit: str | None) -> str:
    """The command that continues this run where it stopped."""
    import shlex

    args = ["train", str(config), "--shards", str(shards), "--features", str(features), "--out", str(out),
            *(["--time-limit", time_limit] if time_limit else []), *overrides, "--resume"]
    return " ".join([distributed_launcher() or "mm", *map(shlex.quote, args)])


def distributed_launcher() -> str | None:
    """How this process was started when several ranks run it (the resume command is the same launch)."""
    import os

    if os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("TORCHELASTIC_RESTART_COUNT") is not None:
        return "torchrun [the same options] -m trimodal"
    if os.environ.get("SLURM_STEP_NUM_TASKS") and os.environ.get("SLURM_PROCID") is not None:
        return "srun [the same options] python -m trimodal"
    return None


def _say_start(start) -> None:
    say(_parameters_line(start.parameters, start.trainable, start.device))
    ranks = f"{start.world_size} ranks × {start.batch_per_rank}" if start.world_size > 1 else "1 process"
    say(f"batch: {start.batch_size} samples a step ({ranks}); {start.steps_per_epoch} steps an epoch, "
        f"{start.dropped_per_epoch} training samples in no batch of an epoch (a different tail each epoch); "
        f"{start.data_streams} data stream(s)")
    for note in start.notes:
        warn(note)


def _parameters_line(total: int, trainable: int, device: str, trained: bool = False) -> str:
    share = f" ({trainable / total:.2%})" if total else ""
    return (f"model: {total:,} parameters, {trainable:,} trainable{share}, "
            f"{'trained' if trained else 'training'} on {device}")
