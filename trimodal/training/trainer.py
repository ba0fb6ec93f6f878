"""`mm train`: one readable training loop over the streamed shards and the feature store, in one process or
in many under torchrun (DistributedDataParallel).

    mm train configs/mmn-flickr8k.toml --shards shards/flickr8k --features features/flickr8k.zarr --out runs/mmn
    torchrun --nproc-per-node 8 -m trimodal train configs/mmn-flickr8k.toml --shards … --features … --out runs/mmn

AdamW with a linear warm-up then cosine schedule (`lr_at`), gradient clipping and accumulation, bf16
autocast on CUDA. Every epoch ends with validation retrieval, `checkpoints/last.*` (and `best.*` when
validation improves), records in `metrics.jsonl`, TensorBoard scalars and fresh PNG plots.

With N ranks: `train.batch_size` is the global batch (each rank takes batch_size / N rows of every global
batch, `sample_order`); every rank builds the same model and DDP averages the gradients; `step_loss`
gathers every rank's latents before the family's loss, so contrastive losses see the global batch;
validation embeds each rank's share of the split and gathers it; rank 0 alone writes the run folder.
"""

from __future__ import annotations

import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from trimodal import distributed
from trimodal.errors import ConfigError, TrimodalError
from trimodal.features.audio import MelConfig
from trimodal.features.store import audio_layout
from trimodal.progress import SILENT, Reporter
from trimodal.signals import StopRequests, ignore_stop_signals
from trimodal.training.checkpoint import load_weights, read_checkpoint, save_checkpoint
from trimodal.training.config import RunConfig, load_config
from trimodal.training.data import TrimodalDataset, check_shared_memory, load_split, loader_failure, open_sources
from trimodal.training.evaluate import evaluate_split, mean_recall
from trimodal.training.models import build_model, model_defaults, parameter_counts
from trimodal.training.models.family import Family, store_settings
from trimodal.training.optimization import Optimization
from trimodal.training.plots import plot_run
from trimodal.storage import absolute
from trimodal.training.run_storage import RunFolder
from trimodal.training.run_files import RunLog, truncate_metrics, write_resolved_config
from trimodal.training.settings import TrainConfig
from trimodal.training.stopping import Stop, StepBoundary

CHECKPOINTS = "checkpoints"
# Redrawing the PNG plots costs ~0.5 s (mmn-tiny's losses, recalls and attention heads on the 2-core CPU):
# nothing next to a real epoch, 15% of a tiny one. They are redrawn at an epoch's end at most this often,
# and once more when the run ends if an epoch's redraw was skipped.
PLOT_EVERY_SECONDS = 30.0


@dataclass
class TrainResult:
    run: Path
    parameters: int
    device: str
    epochs_run: int
    best_epoch: int | None
    best_mean_recall: float | None
    last_val: dict | None
    train_seconds: float = 0.0  # inside the training epochs: loading, steps; no validation or checkpoints
    train_steps: int = 0
    trainable_parameters: int | None = None
    world_size: int = 1
    samples_seen: int = 0  # by all ranks together, inside the training epochs
    stopped: Stop | None = None  # where a signal or the time limit stopped the run (checkpoint written)


@dataclass
class RunStart:
    """What `mm train` says before the first step (the CLI prints it on rank 0)."""

    parameters: int
    trainable: int
    device: str
    world_size: int
    batch_size: int  # global
    batch_per_rank: int
    steps_per_epoch: int
    dropped_per_epoch: int  # training samples in no batch of an epoch
    data_streams: int
    notes: list[str]


def max_audio_frames(train: TrainConfig, store_config: dict | None = None) -> int:
    """Frames in `max_audio_seconds` of the store's audio features (log-mels: 100 a second)."""
    audio = (store_config or {}).get("audio")
    if audio and "n_mels" not in audio:
        return max(1, int(train.max_audio_seconds * audio_layout(audio)[2]))
    return MelConfig().frames(int(train.max_audio_seconds * MelConfig().sample_rate))


def batch_bytes(train: TrainConfig, store_config: dict, rows: int) -> int:
    """An upper bound of one collated batch of `rows` rows (float32 images and frames, int64 tokens, masks)."""
    per_sample = 64
    if store_config.get("image"):
        per_sample += 4 * store_config["image"]["embed_dim"]
    if store_config.get("text"):
        per_sample += 8 * store_config["text"]["context_length"]
    if store_config.get("audio"):
        per_sample += (4 * audio_layout(store_config["audio"])[1] + 1) * max_audio_frames(train, store_config)
    return per_sample * rows


def build_from_config(config: RunConfig, store_config: dict) -> tuple[Family, dict]:
    """The config's model, with the sizes the store decides for the settings its family takes (unless the
    config sets them), and those settings."""
    accepted = model_defaults(config.model_name)
    settings = {**{k: v for k, v in store_settings(store_config).items() if k in accepted}, **config.model}
    return build_model(config.model_name, **settings), settings


def train(config_path: Path, shards: Path, features: Path, out: Path, *, resume: bool = False,
          overwrite: bool = False, overrides: list[str] = (), reporter: Reporter = SILENT,
          stop_after_epoch: int | None = None, stop_at_step: int | None = None, time_limit: float | None = None,
          on_start=None) -> TrainResult:
    """Train the model of `config_path` into the run folder `out`, in this process or, under torchrun or
    srun, as one rank of many. `on_start(RunStart)` is told the model's size and the batch layout before
    the first step.

    SIGTERM, SIGUSR1 and a first Ctrl-C stop the run after the current step with a checkpoint to resume
    from, as does `time_limit` (minutes; `train.max_minutes`): the result's `stopped` says where. Tests
    stop a run the same ways with `stop_at_step` (after that optimizer step) and `stop_after_epoch` (after
    that epoch's checkpoint)."""
    started = time.monotonic()
    config = load_config(config_path, list(overrides))
    settings = config.train
    if time_limit is not None:
        settings.max_minutes = time_limit
    with StopRequests() as requests, distributed.session(settings.device, backend=settings.dist_backend,
                                                         timeout_s=settings.dist_timeout_s) as dist:
        boundary = StepBoundary(settings, dist, requests, started, stop_at_step)
        return _train(config, absolute(shards), absolute(features), RunFolder(out), dist, boundary,
                      resume=resume, overwrite=overwrite, reporter=reporter if dist.main else SILENT,
                      stop_after_epoch=stop_after_epoch, on_start=on_start if dist.main else None)


def _train(config: RunConfig, shards: Path, features: Path, folder: RunFolder, dist: distributed.Dist,
           boundary: StepBoundary, *, resume: bool, overwrite: bool, reporter: Reporter,
           stop_after_epoch: int | None, on_start) -> TrainResult:
    settings = config.train
    run = folder.local  # the run's own folder, or the local copy of one in object storage
    val_split = settings.val_split
    sources = open_sources(shards, features, ["train"])
    has_val = val_split in sources.store.splits() and val_split in sources.index["splits"]
    if settings.batch_size % dist.world_size:
        raise ConfigError(f"train.batch_size = {settings.batch_size} is the global batch; it must be a multiple of "
                          f"the {dist.world_size} ranks")
    rows = settings.batch_size // dist.world_size
    if settings.num_workers > 0:  # before the run folder exists: a rerun after the fix starts clean
        check_shared_memory(batch_bytes(settings, sources.store.config, rows))
    _seed_everything(settings.seed)  # the same initial weights on every rank
    # Built before the run folder is touched: a bad model setting leaves no folder (and --overwrite
    # does not delete the previous run for nothing).
    model, model_settings = build_from_config(config, sources.store.config)
    unread = sorted(set(settings.modalities) - set(model.modalities))
    if unread:
        raise ConfigError(f"model {config.model_name!r} reads {', '.join(model.modalities)}, not {', '.join(unread)}; "
                          f"set train.modalities to {list(model.modalities)}")
    distributed.on_main(lambda: folder.prepare(resume=resume, overwrite=overwrite), "preparing the run folder")
    state = distributed.on_main(lambda: _read_state(run) if resume else None, "reading the checkpoint")
    streams, notes = _data_streams(settings, dist.world_size, state)
    use_wandb = "wandb" in settings.loggers and _wandb_available(settings, notes)
    if state is not None and not state.get("epoch_done", True):
        notes += _mid_epoch_notes(state, settings, dist.world_size, streams)
    model.to(dist.device)
    parameters, trainable = parameter_counts(model)
    frames = max_audio_frames(settings, sources.store.config)
    dataset = TrimodalDataset(sources, split="train", modalities=settings.modalities, batch_size=settings.batch_size,
                              shuffle=True, seed=settings.seed, shuffle_buffer=settings.shuffle_buffer,
                              max_audio_frames=frames, drop_last=True, rank=dist.rank, world_size=dist.world_size,
                              streams=streams, accumulation=settings.grad_accum, inputs=model.store_inputs())
    batches = dataset.batches_per_epoch
    steps_per_epoch = batches // settings.grad_accum
    if steps_per_epoch < 1:
        raise ConfigError(f"the training split has {dataset.samples} samples, too few for one step of "
                          f"{settings.batch_size} × {settings.grad_accum} (batch × accumulation); lower train.batch_size")
    total_steps = steps_per_epoch * settings.epochs
    total_steps = min(total_steps, settings.max_steps) if settings.max_steps else total_steps
    dropped = dataset.plan(1).dropped  # the same for any number of loader workers
    # Persistent workers: no new processes (and store opening) every epoch; they follow set_epoch(). The
    # loader draws its worker seeds from its own generator, not the global RNG that dropout uses. Stop
    # signals are the main process's: a worker ignores them and ends when the loader ends it.
    loader = DataLoader(dataset, batch_size=None, num_workers=settings.num_workers,
                        pin_memory=dist.device.type == "cuda", persistent_workers=settings.num_workers > 0,
                        generator=torch.Generator().manual_seed(settings.seed),
                        worker_init_fn=ignore_stop_signals if settings.num_workers > 0 else None)
    val_data = load_split(sources, val_split, settings.modalities, frames, model.store_inputs()) if has_val else None
    probe = _attention_probe(settings, sources, val_split if has_val else None, model, frames) if dist.main else None
    optimization = model.make_optimization(settings, total_steps)

    start_epoch, start_batch, step, best, best_epoch, running = 0, 0, 0, -1.0, None, {}
    if state is not None:
        # Rank 0 reads the weights; the other ranks receive them when DDP starts (it broadcasts rank 0's).
        distributed.on_main(lambda: _resume_files(run, model, state), "reading the checkpoint")
        optimization.load_state_dict(state.get("optimization") or {"optimizer": state["optimizer"]})
        step, best, best_epoch = state["step"], state["best"], state.get("best_epoch")
        if state.get("epoch_done", True):
            start_epoch = state["epoch"] + 1
        else:
            start_epoch, start_batch = state["epoch"], state["batches_done"]
            running = {k: v.to(dist.device) if torch.is_tensor(v) else v for k, v in state["running"].items()}
    if on_start is not None:
        on_start(RunStart(parameters, trainable, str(dist.device), dist.world_size, settings.batch_size, rows,
                          steps_per_epoch, dropped, streams, notes))
    step_loss = _wrap(StepLoss(model, settings.modalities, settings.amp), dist)
    opened = {}

    def open_run_files() -> None:
        write_resolved_config(run, config, model_settings, {"data_streams": streams},
                              {"shards": str(shards), "features": str(features)},
                              {"parameters": parameters, "trainable_parameters": trainable, "device": str(dist.device),
                               "world_size": dist.world_size, "batch_per_rank": rows,
                               "steps_per_epoch": steps_per_epoch, "samples_dropped_per_epoch": dropped})
        opened["log"] = RunLog(run, tensorboard="tensorboard" in settings.loggers,
                               wandb=_open_wandb(run, settings) if use_wandb else None)

    distributed.on_main(open_run_files, "writing config.resolved.toml")
    log = opened.get("log") or RunLog(run, enabled=False)

    def progress(epoch: int, step: int) -> dict:
        return {"optimization": optimization.state_dict(), "epoch": epoch, "step": step, "best": best,
                "best_epoch": best_epoch, "data_streams": streams, "num_workers": settings.num_workers,
                "world_size": dist.world_size}

    def checkpoint(epoch: int, step: int, done: int, running: dict) -> None:
        """A mid-epoch checkpoint: every rank's random state gathered, rank 0 writes."""
        began = time.monotonic()
        randoms = distributed.all_gather_object(random_states(dist.device))
        state = {**progress(epoch, step), "epoch_done": False, "batches_done": done, "random": randoms,
                 "running": {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in running.items()}}
        def write() -> None:
            save_checkpoint(run / CHECKPOINTS, model, state, keep=settings.keep_checkpoints)
            folder.publish()

        distributed.on_main(write, "writing a checkpoint")
        boundary.checkpointed(time.monotonic() - began)

    last_val, train_seconds, train_steps, seen, stopped = None, 0.0, 0, 0, None
    plot_clock = _PlotClock()
    try:
        for epoch in range(start_epoch, settings.epochs):
            if settings.max_steps and step >= settings.max_steps:
                break
            first = start_batch if epoch == start_epoch else 0
            dataset.set_epoch(epoch, first)
            if first:
                _restore_random(state, settings.seed, epoch, step, dist)
            else:
                _seed_epoch(settings.seed, epoch, dist.rank)
                running = {}
            stage = enter_stage(model, settings, epoch)
            began, first_step = time.monotonic(), step
            boundary.restart_clock()
            outcome = _train_epoch(step_loss, model, loader, optimization, settings, dist, epoch, step, batches, log,
                                   reporter, stage, first_batch=first, running=running, boundary=boundary,
                                   checkpoint=lambda step, done, running: checkpoint(epoch, step, done, running),
                                   probe=probe)
            step = outcome.step
            train_seconds, train_steps = train_seconds + time.monotonic() - began, train_steps + step - first_step
            seen += outcome.rows * dist.world_size
            if outcome.stopped:
                checkpoint(epoch, step, outcome.done, outcome.running)
                stopped = Stop(outcome.stopped, epoch, step, outcome.done, batches)
                break
            record = {"type": "val", "epoch": epoch, "step": step, **({"stage": stage["name"]} if stage else {})}
            began = time.monotonic()
            if val_data is not None:
                record["directions"] = evaluate_split(model, val_data, dist.device, settings.eval_batch_size)
                record["mean_recall"] = mean_recall(record["directions"])
                last_val = record
            boundary.validated(time.monotonic() - began)
            optimization.end_epoch(record.get("mean_recall"))
            score = record.get("mean_recall", epoch)
            # With stages, the best checkpoint comes from the last one: earlier stages train a partial model.
            improved = score > best and epoch >= settings.last_stage_start()
            if improved:
                best, best_epoch = score, epoch
            end_state = {**progress(epoch, step), "epoch_done": True}
            began = time.monotonic()
            draw = plot_clock.due()
            distributed.on_main(lambda: _end_epoch(folder, model, log, record, end_state, improved,
                                                   settings.keep_checkpoints, probe, draw),
                                "writing checkpoints")
            boundary.checkpointed(time.monotonic() - began)
            if stop_after_epoch is not None and epoch >= stop_after_epoch:
                break
            more = epoch + 1 < settings.epochs and not (settings.max_steps and step >= settings.max_steps)
            reason = boundary.stop_between_epochs() if more else None
            if reason:
                stopped = Stop(reason, epoch + 1, step, 0, batches)
                break
        if stopped is None:  # a stop leaves them to the resumed run: it must be quick
            # Rank 0's clock alone decides: each rank's own could disagree, and on_main is a collective.
            distributed.on_main(lambda: plot_clock.pending and _draw_plots(log, folder, model, probe, step),
                                "writing plots")
    finally:
        log.close()
    distributed.on_main(folder.publish, "publishing the run")  # the last records and TensorBoard events
    return TrainResult(folder.target, parameters, str(dist.device), settings.epochs - start_epoch, best_epoch,
                       best if best_epoch is not None and val_data is not None else None, last_val,
                       train_seconds, train_steps, trainable, dist.world_size, seen, stopped)


def _read_state(run: Path) -> dict:
    state, weights = read_checkpoint(run / CHECKPOINTS)
    return {**state, "weights_path": str(weights)}


def _resume_files(run: Path, model: Family, state: dict) -> None:
    load_weights(model, Path(state["weights_path"]))
    # What an interrupted run logged after the checkpoint.
    truncate_metrics(run / "metrics.jsonl", state["epoch"], state["step"], state.get("epoch_done", True))


def _mid_epoch_notes(state: dict, settings: TrainConfig, world_size: int, streams: int) -> list[str]:
    """A mid-epoch checkpoint continues only with the data layout it was written with; what else changes."""
    where = f"the checkpoint is in the middle of epoch {state['epoch'] + 1} (step {state['step']})"
    if state.get("num_workers", settings.num_workers) != settings.num_workers:
        raise ConfigError(f"{where}, read with train.num_workers={state['num_workers']}; resume with that setting "
                          "(it decides the epoch's sample order)")
    if state["data_streams"] != streams:
        raise ConfigError(f"{where}, read as {state['data_streams']} data streams, which {world_size} ranks cannot "
                          f"share; resume on a number of ranks that divides {state['data_streams']}")
    if len(state["random"]) != world_size:
        return [f"the run was stopped on {len(state['random'])} rank(s) and continues on {world_size}: the global "
                "sample order is the same, the random streams (dropout) start afresh from here"]
    return []


def _data_streams(settings: TrainConfig, world_size: int, state: dict | None) -> tuple[int, list[str]]:
    """The run's data streams: those it started with, while the world size divides them; else (a resumed
    run on a world size that does not) the world size, from this epoch on. And what a resumed run changed
    of its global sample order."""
    notes = []
    mid_epoch = state is not None and not state.get("epoch_done", True)
    if not mid_epoch and state is not None and state.get("num_workers", settings.num_workers) != settings.num_workers:
        notes.append(f"the run read its data with {state['num_workers']} loader worker(s), now {settings.num_workers}: "
                     "the global sample order changes from this epoch on")
    if state is None and settings.data_streams % world_size:
        raise ConfigError(f"train.data_streams = {settings.data_streams} cannot be shared by {world_size} ranks: make it "
                          "a multiple of the number of ranks (or 0, the number of ranks)")
    started = (state or {}).get("data_streams") or settings.data_streams or world_size
    if started % world_size == 0 or mid_epoch:  # mid-epoch: _mid_epoch_notes refuses a change
        return started, notes
    return world_size, notes + [f"the run read {started} data stream(s), which {world_size} ranks cannot share; from "
                                f"this epoch on it reads {world_size} (the global sample order changes from here)"]


def _wrap(step_loss: StepLoss, dist: distributed.Dist):
    """DDP around the step's loss with several ranks (it broadcasts rank 0's weights and buffers first); the
    module itself otherwise. Unused parameters are expected: a stage trains part of a model, a controller is
    not in the forward pass, a modality may be absent."""
    if not dist.enabled:
        return step_loss
    from torch.nn.parallel import DistributedDataParallel

    with distributed.collective("starting DistributedDataParallel"):
        return DistributedDataParallel(step_loss, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
                                       find_unused_parameters=True)


def _end_epoch(folder: RunFolder, model: Family, log: RunLog, record: dict, state: dict, improved: bool,
               keep: int, probe=None, draw: bool = True) -> None:
    """Rank 0's part of an epoch's end: records, checkpoints (atomic), plots (when `draw`), then the run
    published."""
    log.val_record(record)
    for extra in model.epoch_records():
        log.record({"epoch": record["epoch"], "step": record["step"], **extra})
    save_checkpoint(folder.local / CHECKPOINTS, model, state, keep=keep, best=improved)
    if draw:
        _draw_plots(log, folder, model, probe, record["step"])
    if improved:
        log.best(record)
    folder.publish()


def _draw_plots(log: RunLog, folder: RunFolder, model: Family, probe, step: int) -> None:
    """The run's PNG plots (and the attention probe's) redrawn and logged at `step`; published with the run."""
    log.images(plot_run(folder.local, model) + (probe.plot(folder.local / "plots") if probe is not None else []), step)


class _PlotClock:
    """Whether an epoch's end redraws the plots (at most every PLOT_EVERY_SECONDS; the first always), and
    whether a redraw is pending for the end of the run."""

    def __init__(self):
        self.last, self.pending = None, False

    def due(self) -> bool:
        now = time.monotonic()
        if self.last is not None and now - self.last < PLOT_EVERY_SECONDS:
            self.pending = True
            return False
        self.last, self.pending = now, False
        return True


def _attention_probe(settings: TrainConfig, sources, split: str | None, model: Family, frames: int):
    """The AttentionProbe of `train.attention_every` over the first rows of the validation split, or None."""
    from trimodal.training.attention_heads import PROBE_ROWS, AttentionProbe

    if not settings.attention_every or split is None:
        return None
    # Rank 0 alone probes, so it reads the rows as one process would, whatever the number of ranks.
    rows = TrimodalDataset(sources, split=split, modalities=settings.modalities, batch_size=PROBE_ROWS, shuffle=False,
                           max_audio_frames=frames, inputs=model.store_inputs(), rank=0, world_size=1)
    batch = next(iter(rows), None)
    return AttentionProbe(batch, settings.attention_every) if batch is not None else None


def _wandb_available(settings: TrainConfig, notes: list[str]) -> bool:
    """Whether wandb can log; when it cannot, a WandbUnavailable, or (train.wandb_optional) a note and False."""
    from trimodal.training.wandb_log import WandbUnavailable, check_available

    try:
        check_available()
    except WandbUnavailable as error:
        if not settings.wandb_optional:
            raise
        notes.append(f"{error}: training without wandb (train.wandb_optional)")
        return False
    return True


def _open_wandb(run: Path, settings: TrainConfig):
    """The wandb run of `run`, with config.resolved.toml (just written) as its config."""
    import tomllib

    from trimodal.training.wandb_log import WandbLog

    config = tomllib.loads((run / "config.resolved.toml").read_text(encoding="utf-8"))
    return WandbLog(run, config, settings.wandb_project, settings.wandb_entity)


def enter_stage(model: Family, settings: TrainConfig, epoch: int) -> dict | None:
    """The stage of `epoch`, told to the model; a family that trains in stages and has none configured
    trains its `default_losses` throughout."""
    stage = settings.stage_at(epoch)
    model.set_stage(tuple(stage["losses"]) if stage else model.default_losses)
    return stage


def stage_weights(settings: TrainConfig, stage: dict | None) -> dict:
    """The loss weights in force: the stage's, or train.loss_weights without stages."""
    return stage.get("weights", {}) if stage else settings.loss_weights


class StepLoss(torch.nn.Module):
    """One step's loss as a module (what DDP wraps, so that every parameter the loss uses, the temperature
    included, is used inside its forward): the family's latents of this rank's rows, gathered from every
    rank with gradients, then the family's loss over the global batch."""

    def __init__(self, family: Family, modalities, amp: bool):
        super().__init__()
        self.family, self.modalities, self.amp = family, tuple(modalities), amp

    def forward(self, batch: dict, weights: dict | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        device = next(self.family.parameters()).device
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp and device.type == "cuda"):
            latents = self.family(batch)
        latents = {name: distributed.gather_rows(latents[name]) for name in sorted(latents)}
        present = {m: distributed.gather_rows_detached(batch[f"{m}_present"]) for m in self.modalities}
        return self.family.training_loss(latents, present, weights)


@dataclass
class EpochOutcome:
    step: int  # reached
    rows: int  # this rank trained on
    done: int  # global batches of the epoch done (the skipped ones of a resumed epoch included)
    running: dict  # the sums of the training record being gathered
    stopped: str | None = None  # why the epoch ended early (a signal, the time limit)


def _train_epoch(step_loss, model: Family, loader, optimization: Optimization, settings: TrainConfig,
                 dist: distributed.Dist, epoch: int, step: int, batches: int, log: RunLog, reporter: Reporter,
                 stage: dict | None = None, *, first_batch: int = 0, running: dict | None = None,
                 boundary: StepBoundary | None = None, checkpoint=None, probe=None) -> EpochOutcome:
    """One epoch's steps from global batch `first_batch` on. After every optimizer step `boundary` says
    whether to stop (the epoch ends there) and whether `checkpoint(step, batches_done, running)` is due."""
    model.train()
    device = dist.device
    started, seen, pending, done, stopped = time.monotonic(), 0, 0, first_batch, None
    running = dict(running or {})
    weights = stage_weights(settings, stage)
    label = f"epoch {epoch + 1}/{settings.epochs}" + (f" ({stage['name']})" if stage else "")
    rows = settings.batch_size // dist.world_size
    with reporter.task(label, total=batches * settings.batch_size, unit="samples") as task:
        if first_batch:
            task.update(completed=first_batch * settings.batch_size)
        for batch in _batches(loader) if first_batch < batches else ():
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            pending += 1
            done += 1
            # Gradients are all-reduced once per optimizer step, not on accumulation steps.
            syncing = pending == settings.grad_accum or not dist.enabled
            with (nullcontext() if syncing else step_loss.no_sync()), distributed.collective("a training step"):
                loss, parts = step_loss(batch, weights)
                (loss / settings.grad_accum).backward()
            seen += len(batch["keys"])
            for name, value in {"loss": loss, **parts}.items():  # summed on the device: no sync per step
                running[name] = running.get(name, 0.0) + value.detach()
            running["batches"] = running.get("batches", 0) + 1
            task.advance(len(batch["keys"]) * dist.world_size)
            if dist.main and _note_due(seen, rows):
                task.update(description=f"{label} loss {float(loss.detach()):.3f}")
            if pending < settings.grad_accum:
                continue
            with distributed.collective("an optimizer step"):
                step = optimization.step(step, loss)
            model.after_optimizer_step()
            pending = 0
            if probe is not None and probe.due(step):  # rank 0's alone: no collective inside
                log.record(probe(model, epoch, step))
            if step % settings.log_every == 0 and dist.main:
                _log_train(log, running, epoch, step, optimization,
                           seen * dist.world_size / (time.monotonic() - started), model, stage)
            if step % settings.log_every == 0:
                running = {}
            if settings.max_steps and step >= settings.max_steps:
                break
            if boundary is not None:
                stopped, due = boundary.at_step(step, epoch_ends_next=done + settings.grad_accum >= batches)
                if stopped:
                    break
                if due and done < batches:
                    checkpoint(step, done, running)
    ended = stopped or (settings.max_steps and step >= settings.max_steps)
    expected = (batches - first_batch) * rows
    if not ended and seen < expected:
        raise TrimodalError(f"epoch {epoch + 1} saw {seen} of its {expected} training samples on rank {dist.rank}: "
                            "the data loader lost batches (its workers' errors are above); if they could not use "
                            "shared memory, enlarge /dev/shm or set train.num_workers=0")
    return EpochOutcome(step, seen, done, running, stopped)


def _batches(loader):
    """The loader's batches; a worker that dies becomes one clear error instead of torch's traceback."""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except RuntimeError as error:
            if "DataLoader worker" in str(error):
                raise loader_failure(error) from error
            raise
        yield batch


def _note_due(seen: int, batch_size: int, every: int = 10) -> bool:
    """Refresh the loss shown on the progress bar every few batches (reading it syncs the GPU)."""
    return (seen // batch_size) % every == 1


def _log_train(log: RunLog, running: dict, epoch: int, step: int, optimization: Optimization,
               samples_per_s: float, model: Family, stage: dict | None = None) -> None:
    batches = running.pop("batches")
    means = {name: float(total) / batches for name, total in running.items()}
    log.train_record({"type": "train", "epoch": epoch, "step": step, **({"stage": stage["name"]} if stage else {}),
                      "lr": optimization.lr, "loss": means.pop("loss"), "losses": means, "samples_per_s": samples_per_s,
                      "temperature": float(1 / model.logit_scale.detach().exp()), **optimization.log_record()})


def random_states(device: torch.device) -> dict:
    """This process's random generators (python, numpy, torch CPU and CUDA), as a weights-only-loadable dict.
    Loader workers draw nothing from theirs: every draw of the data path comes from (seed, epoch, shard)."""
    version, keys, gauss = random.getstate()
    name, numpy_keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(keys), gauss], "torch": torch.get_rng_state(),
             "numpy": [name, numpy_keys.tolist(), int(position), int(has_gauss), float(cached)]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_random(state: dict, seed: int, epoch: int, step: int, dist: distributed.Dist) -> None:
    """This rank's random generators as the checkpoint saved them; on another number of ranks, fresh ones
    from (seed, epoch, step, rank)."""
    saved = state["random"]
    if len(saved) != dist.world_size:
        _seed_everything(int(np.random.SeedSequence([seed, epoch, step, dist.rank]).generate_state(1)[0]))
        return
    mine = saved[dist.rank]
    version, keys, gauss = mine["python"]
    random.setstate((version, tuple(keys), gauss))
    name, numpy_keys, position, has_gauss, cached = mine["numpy"]
    np.random.set_state((name, np.asarray(numpy_keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(mine["torch"])
    if dist.device.type == "cuda" and "cuda" in mine:
        torch.cuda.set_rng_state(mine["cuda"], dist.device)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Every epoch's random stream (dropout, …) from (seed, epoch, rank): a run resumed at an epoch
    boundary, on any number of ranks, continues as an uninterrupted one would, and ranks differ."""
    _seed_everything(int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0]))
