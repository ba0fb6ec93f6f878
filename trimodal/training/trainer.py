"""`mm train`: one readable training loop over the streamed shards and the feature store.

    mm train configs/mmn-flickr8k.toml --shards shards/flickr8k --features features/flickr8k.zarr --out runs/mmn

AdamW with a linear warm-up then cosine schedule (`lr_at`), gradient clipping and accumulation, bf16
autocast on CUDA. Every epoch ends with validation retrieval, `checkpoints/last.*` (and `best.*` when
validation improves), a line in `metrics.jsonl`, TensorBoard scalars and fresh PNG plots.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from trimodal import __version__
from trimodal.errors import ConfigError, TrimodalError
from trimodal.features.audio import MelConfig
from trimodal.features.store import audio_layout
from trimodal.features.image import resolve_device
from trimodal.progress import SILENT, Reporter
from trimodal.training.checkpoint import load_state, load_weights, save_state, save_weights
from trimodal.training.config import RunConfig, TrainConfig, dump_toml, load_config
from trimodal.training.data import TrimodalDataset, check_shared_memory, load_split, loader_failure, open_sources
from trimodal.training.evaluate import evaluate_split, mean_recall
from trimodal.training.losses import MAX_LOGIT_SCALE, training_loss
from trimodal.training.models import build_model, model_defaults, model_inputs, parameter_counts
from trimodal.training.optimization import Optimization, flatten, make_optimization
from trimodal.training.plots import plot_run, read_metrics

CHECKPOINTS = "checkpoints"


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


def max_audio_frames(train: TrainConfig, store_config: dict | None = None) -> int:
    """Frames in `max_audio_seconds` of the store's audio features (log-mels: 100 a second)."""
    audio = (store_config or {}).get("audio")
    if audio and "n_mels" not in audio:
        return max(1, int(train.max_audio_seconds * audio_layout(audio)[2]))
    return MelConfig().frames(int(train.max_audio_seconds * MelConfig().sample_rate))


def data_dims(store_config: dict, model_settings: dict, accepted=None) -> dict:
    """Model settings the store decides (input sizes; for families that take them, the towers it ran),
    unless the config sets them itself. `accepted`: the family's settings (default: input sizes only)."""
    dims = {}
    image, text, audio = store_config.get("image"), store_config.get("text"), store_config.get("audio")
    if image:
        dims["image_dim"] = image["embed_dim"]
        if image.get("family") in ("open_clip", "timm"):  # a tower (not vectors a dataset ships)
            dims["image_tower"] = image["encoder"]
    if text:
        dims["vocab_size"] = text["vocab_size"]
        dims["context_length"] = text["context_length"]
        if text.get("tower"):
            dims["text_tower"], dims["text_dim"] = text["tower"]["encoder"], text["tower"]["embed_dim"]
    if audio:
        dims["n_mels"] = audio_layout(audio)[1]  # the frame width: mel bands or a speech tower's width
        if "n_mels" not in audio:
            dims["audio_tower"] = audio["encoder"]
    dims = {k: v for k, v in dims.items() if k in (accepted or ("image_dim", "vocab_size", "context_length", "n_mels"))}
    return {**dims, **model_settings}


def batch_bytes(train: TrainConfig, store_config: dict) -> int:
    """An upper bound of one collated batch's size (float32 images and frames, int64 tokens, masks)."""
    per_sample = 64
    if store_config.get("image"):
        per_sample += 4 * store_config["image"]["embed_dim"]
    if store_config.get("text"):
        per_sample += 8 * store_config["text"]["context_length"]
    if store_config.get("audio"):
        per_sample += (4 * audio_layout(store_config["audio"])[1] + 1) * max_audio_frames(train, store_config)
    return per_sample * train.batch_size


def build_from_config(config: RunConfig, store_config: dict):
    settings = data_dims(store_config, config.model, model_defaults(config.model_name))
    return build_model(config.model_name, **settings), settings


def prepare_run_dir(run: Path, *, resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other")
    if resume:
        if not (run / CHECKPOINTS / "last.state.pt").is_file():
            raise TrimodalError(f"{run} has no checkpoints/last.state.pt to resume from")
        return
    if run.exists() and any(run.iterdir()):
        if not overwrite:
            raise TrimodalError(f"{run} is not empty; pass --resume to continue that run or --overwrite to replace it")
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)


def train(config_path: Path, shards: Path, features: Path, out: Path, *, resume: bool = False,
          overwrite: bool = False, overrides: list[str] = (), reporter: Reporter = SILENT,
          stop_after_epoch: int | None = None, on_model=None) -> TrainResult:
    """Train the model of `config_path` into the run folder `out`. `stop_after_epoch` ends the run after
    that epoch's checkpoint, as an interruption at an epoch boundary would (tests use it). `on_model(total,
    trainable, device)` is told the parameter counts once the model is built."""
    config = load_config(config_path, list(overrides))
    settings = config.train
    shards, features, run = Path(shards).resolve(), Path(features).resolve(), Path(out)
    index, store = open_sources(shards, features, "train")
    if settings.num_workers > 0:  # before the run folder exists: a rerun after the fix starts clean
        check_shared_memory(batch_bytes(settings, store.config))
    device = resolve_device(settings.device)
    _seed_everything(settings.seed)
    # Built before the run folder is touched: a bad model setting leaves no folder (and --overwrite
    # does not delete the previous run for nothing).
    model, model_settings = build_from_config(config, store.config)
    unread = sorted(set(settings.modalities) - set(getattr(model, "modalities", settings.modalities)))
    if unread:
        raise ConfigError(f"model {config.model_name!r} reads {', '.join(model.modalities)}, not {', '.join(unread)}; "
                          f"set train.modalities to {list(model.modalities)}")
    prepare_run_dir(run, resume=resume, overwrite=overwrite)
    model.to(device)
    parameters, trainable = parameter_counts(model)
    if on_model is not None:
        on_model(parameters, trainable, str(device))
    inputs, frames = model_inputs(model), max_audio_frames(settings, store.config)
    dataset = TrimodalDataset(shards, features, "train", modalities=settings.modalities, batch_size=settings.batch_size,
                              shuffle=True, seed=settings.seed, shuffle_buffer=settings.shuffle_buffer,
                              max_audio_frames=frames, drop_last=True, inputs=inputs)
    if dataset.samples < settings.batch_size * max(1, settings.num_workers):
        raise ConfigError(f"the training split has {dataset.samples} samples, too few for full batches of "
                          f"{settings.batch_size} on each of {max(1, settings.num_workers)} loader worker(s); "
                          "lower train.batch_size or train.num_workers")
    # Persistent workers: no new processes (and store opening) every epoch; they follow set_epoch(). The
    # loader draws its worker seeds from its own generator, not the global RNG that dropout uses, so a
    # resumed run (a new loader) continues the same random stream as an uninterrupted one.
    loader = DataLoader(dataset, batch_size=None, num_workers=settings.num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=settings.num_workers > 0,
                        generator=torch.Generator().manual_seed(settings.seed))
    val_data = None
    if settings.val_split in store.splits():
        val_data = load_split(shards, features, settings.val_split, settings.modalities, frames, inputs)
    # Every loader worker drops its last partial batch (contrastive losses want full batches).
    steps_per_epoch = max(1, dataset.samples // (settings.batch_size * settings.grad_accum))
    total_steps = steps_per_epoch * settings.epochs
    optimization = make_optimization(model, settings, total_steps)

    start_epoch, step, best, best_epoch = 0, 0, -1.0, None
    if resume:
        load_weights(model, run / CHECKPOINTS / "last.safetensors")
        state = load_state(run / CHECKPOINTS / "last.state.pt")
        optimization.load_state_dict(state.get("optimization") or {"optimizer": state["optimizer"]})
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"])
        start_epoch, step, best = state["epoch"] + 1, state["step"], state["best"]
        best_epoch = state.get("best_epoch")
        _truncate_metrics(run / "metrics.jsonl", state["epoch"])
    _write_resolved_config(run, config, model_settings, shards, features, (parameters, trainable), device)

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run / "tensorboard"))
    metrics_file = open(run / "metrics.jsonl", "a", encoding="utf-8")
    last_val, train_seconds, train_steps = None, 0.0, 0
    try:
        for epoch in range(start_epoch, settings.epochs):
            dataset.set_epoch(epoch)
            stage = _enter_stage(model, settings, epoch)
            started, first_step = time.monotonic(), step
            step = _train_epoch(model, loader, optimization, settings, device, epoch, step, dataset.samples,
                                metrics_file, writer, reporter, stage)
            train_seconds, train_steps = train_seconds + time.monotonic() - started, train_steps + step - first_step
            record = {"type": "val", "epoch": epoch, "step": step, **({"stage": stage["name"]} if stage else {})}
            if val_data is not None:
                record["directions"] = evaluate_split(model, val_data, device, settings.eval_batch_size)
                record["mean_recall"] = mean_recall(record["directions"])
                last_val = record
                for direction, values in record["directions"].items():
                    writer.add_scalar(f"val/{direction}/R@10", values["R@10"], epoch)
                writer.add_scalar("val/mean_recall", record["mean_recall"], epoch)
            optimization.end_epoch(record.get("mean_recall"))
            metrics_file.write(json.dumps(record) + "\n")
            if hasattr(model, "quantisation"):
                metrics_file.write(json.dumps({"type": "quantisation", "epoch": epoch, "step": step,
                                               **model.quantisation()}) + "\n")
            metrics_file.flush()
            score = record.get("mean_recall", epoch)
            # With stages, the best checkpoint comes from the last one: earlier stages train a partial model.
            if score > best and epoch >= settings.last_stage_start():
                best, best_epoch = score, epoch
                save_weights(model, run / CHECKPOINTS / "best.safetensors", {"epoch": epoch, "step": step})
            save_weights(model, run / CHECKPOINTS / "last.safetensors", {"epoch": epoch, "step": step})
            state = {"optimization": optimization.state_dict(), "epoch": epoch, "step": step, "best": best,
                     "best_epoch": best_epoch, "torch_rng": torch.get_rng_state()}
            if device.type == "cuda":
                state["cuda_rng"] = torch.cuda.get_rng_state()
            save_state(run / CHECKPOINTS / "last.state.pt", state)
            plot_run(run)
            if stop_after_epoch is not None and epoch >= stop_after_epoch:
                break
    finally:
        metrics_file.close()
        writer.close()
    return TrainResult(run, parameters, str(device), settings.epochs - start_epoch, best_epoch,
                       best if best_epoch is not None and val_data is not None else None, last_val,
                       train_seconds, train_steps, trainable)


def _enter_stage(model, settings: TrainConfig, epoch: int) -> dict | None:
    """The stage of `epoch`, told to the model (`set_stage(losses)`); a family that trains in stages
    and has none configured trains its `default_losses` throughout."""
    stage = settings.stage_at(epoch)
    if hasattr(model, "set_stage"):
        model.set_stage(stage["losses"] if stage else model.default_losses)
    return stage


def _train_epoch(model, loader, optimization: Optimization, settings: TrainConfig, device, epoch, step, samples,
                 metrics_file, writer, reporter, stage: dict | None = None) -> int:
    model.train()
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=settings.amp and device.type == "cuda")
    started, seen, pending = time.monotonic(), 0, 0
    running: dict = {}
    weights = stage.get("weights", {}) if stage else settings.loss_weights
    label = f"epoch {epoch + 1}/{settings.epochs}" + (f" ({stage['name']})" if stage else "")
    with reporter.task(label, total=samples, unit="samples") as task:
        for batch in _batches(loader):
            if len(batch["keys"]) < 2:
                continue
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            present = {m: batch[f"{m}_present"] for m in settings.modalities}
            with amp:
                latents = model(batch)
            loss, pair_losses = training_loss(model, latents, present, weights)
            (loss / settings.grad_accum).backward()
            pending += 1
            seen += len(batch["keys"])
            for name, value in {"loss": loss, **pair_losses}.items():  # summed on the device: no sync per step
                running[name] = running.get(name, 0.0) + value.detach()
            running["batches"] = running.get("batches", 0) + 1
            if pending == settings.grad_accum:
                step = _optimizer_step(model, optimization, step, loss)
                pending = 0
                if step % settings.log_every == 0:
                    _log_train(metrics_file, writer, running, epoch, step, optimization, seen / (time.monotonic() - started),
                               model, stage)
                    running = {}
            task.advance(len(batch["keys"]))
            if _note_due(seen, settings.batch_size):
                task.update(description=f"{label} loss {float(loss.detach()):.3f}")
        if pending:
            step = _optimizer_step(model, optimization, step, loss)
    # Each worker drops at most one partial batch; fewer samples than that means batches were lost.
    expected = samples - max(1, settings.num_workers) * settings.batch_size
    if seen < expected:
        raise TrimodalError(f"epoch {epoch + 1} saw {seen} of {samples} training samples: the data loader lost "
                            "batches (its workers' errors are above); if they could not use shared memory, "
                            "enlarge /dev/shm or set train.num_workers=0")
    return step


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


def _optimizer_step(model, optimization: Optimization, step: int, loss) -> int:
    step = optimization.step(step, loss)
    with torch.no_grad():
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    return step


def _log_train(metrics_file, writer, running: dict, epoch: int, step: int, optimization: Optimization,
               samples_per_s: float, model, stage: dict | None = None) -> None:
    batches = running.pop("batches")
    means = {name: float(total) / batches for name, total in running.items()}
    record = {"type": "train", "epoch": epoch, "step": step, **({"stage": stage["name"]} if stage else {}),
              "lr": optimization.lr,
              "loss": means.pop("loss"), "losses": means, "samples_per_s": samples_per_s,
              "temperature": float(1 / model.logit_scale.detach().exp()), **optimization.log_record()}
    metrics_file.write(json.dumps(record) + "\n")
    metrics_file.flush()
    writer.add_scalar("train/loss", record["loss"], step)
    for pair, value in means.items():
        writer.add_scalar(f"train/loss/{pair}", value, step)
    writer.add_scalar("train/lr", record["lr"], step)
    writer.add_scalar("train/samples_per_s", samples_per_s, step)
    for tag, value in flatten(optimization.log_record()).items():
        writer.add_scalar(f"train/{tag}", value, step)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _truncate_metrics(path: Path, last_epoch: int) -> None:
    """Drop what an interrupted epoch logged after the checkpoint we resume from."""
    kept = [r for r in read_metrics(path) if r["epoch"] <= last_epoch]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


def _versions() -> dict:
    versions = {"trimodal": __version__}
    for package in ("torch", "torchaudio", "open_clip_torch", "zarr", "webdataset", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _git_commit() -> str:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=5)
        return result.stdout.strip() if result.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def _write_resolved_config(run: Path, config: RunConfig, model_settings: dict, shards: Path, features: Path,
                           parameters: tuple[int, int], device) -> None:
    sections = {
        "model": {"name": config.model_name, **model_settings},
        "train": asdict(config.train),
        "data": {"shards": str(shards), "features": str(features)},
        "run": {"parameters": parameters[0], "trainable_parameters": parameters[1], "device": str(device),
                "git_commit": _git_commit(), **_versions()},
    }
    (run / "config.resolved.toml").write_text(dump_toml(sections), encoding="utf-8")
