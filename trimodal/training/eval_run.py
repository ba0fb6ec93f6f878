"""`mm eval`: a trained run's checkpoint evaluated by retrieval on a split, optionally with TTT."""

from __future__ import annotations

import tomllib
from pathlib import Path

from trimodal import distributed
from trimodal.atomic import write_json, write_jsonl
from trimodal.errors import ConfigError, TrimodalError
from trimodal.distributed import resolve_device
from trimodal.training.checkpoint import load_weights
from trimodal.training.data import load_split, open_sources
from trimodal.training.evaluate import (adapted_latents, embed_split, fold_sizes, mean_over_folds, mean_recall,
                                        score_folds, score_latents, split_groups)
from trimodal.training.models import build_model, families_where
from trimodal.training.models.family import EvaluationContext
from trimodal.training.settings import TrainConfig
from trimodal.training.run_storage import RunFolder
from trimodal.training.trainer import CHECKPOINTS, max_audio_frames


def read_resolved_config(run: Path) -> dict:
    path = Path(run) / "config.resolved.toml"
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrimodalError(f"{run} is not a training run (no config.resolved.toml)") from None
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise TrimodalError(f"cannot read {path}: {error}") from error


def load_run(run: Path, checkpoint: str, device: str):
    """(model with the run's `checkpoint` weights on `device`, the run's resolved config, the device)."""
    if checkpoint not in ("best", "last"):
        raise ConfigError(f"--checkpoint must be best or last (got {checkpoint!r})")
    resolved = read_resolved_config(run)
    model_settings = dict(resolved["model"])
    model = build_model(model_settings.pop("name"), **model_settings)
    load_weights(model, Path(run) / CHECKPOINTS / f"{checkpoint}.safetensors")
    target = resolve_device(device)
    return model.to(target).eval(), resolved, target


def evaluate_run(run: Path, *, split: str = "test", checkpoint: str = "best", ttt: bool = False,
                 shards: Path | None = None, features: Path | None = None, device: str = "auto",
                 ttt_k: int | None = None, ttt_step: float | None = None, folds: int | None = None,
                 beams: int = 3) -> dict:
    """Evaluate and write `run/eval-<split>.json`; returns what was written. Under torchrun each rank embeds
    its share of the split and every rank scores the gathered latents (the numbers of one process); rank 0
    adds the family's extras and writes.

    With `folds`, the split's images (in shard order) are also cut into that many consecutive folds, as
    equal as possible with the first ones one larger, and every direction is scored within each fold:
    "directions_folds" per fold and "directions_1k" their mean (COCO's 1k protocol for 5 folds of its
    5,000 Karpathy test images). Folds apply to the plain evaluation only, not to TTT.

    A family adds its own sections and files through `Family.evaluation_extras` (a captioner: "captioning",
    decoded with `beams`, 1 greedy, 3 the default, and `run/captions-<split>.jsonl`)."""
    if beams < 1:
        raise ConfigError(f"--beams must be at least 1 (got {beams})")
    folder = RunFolder(run)  # a run in object storage: its config and checkpoint in a local copy
    folder.fetch(["config.resolved.toml", f"{CHECKPOINTS}/{checkpoint}.safetensors"])
    train = read_resolved_config(folder.local)["train"]
    with distributed.session(device, backend=train.get("dist_backend", "auto"),
                             timeout_s=float(train.get("dist_timeout_s", distributed.DEFAULT_TIMEOUT_S))) as dist:
        result = _evaluate(folder.local, dist, split=split, checkpoint=checkpoint, ttt=ttt, shards=shards,
                         features=features, ttt_options={k: v for k, v in (("k", ttt_k), ("step", ttt_step))
                                                         if v is not None}, folds=folds, beams=beams)
        distributed.on_main(folder.publish, "writing the evaluation to the run")
        return result


def _evaluate(run: Path, dist, *, split: str, checkpoint: str, ttt: bool, shards: Path | None,
              features: Path | None, ttt_options: dict, folds: int | None, beams: int) -> dict:
    model, resolved, target = load_run(run, checkpoint, str(dist.device))
    family = resolved["model"]["name"]
    if ttt:
        check_ttt_options(model, family, ttt_options)
    sources = open_sources(shards or resolved["data"]["shards"], features or resolved["data"]["features"], [split])
    train = resolved["train"]
    frames = max_audio_frames(TrainConfig(max_audio_seconds=float(train["max_audio_seconds"])), sources.store.config)
    data = load_split(sources, split, train["modalities"], frames, model.store_inputs())
    sizes = fold_sizes(len(data.keys), folds) if folds is not None else None
    # Embedded once: the whole split and every fold are scored from the same latents.
    latents, groups = embed_split(model, data, target, train["eval_batch_size"]), split_groups(data)
    result = {"split": split, "checkpoint": checkpoint, "images": len(data.keys),
              "captions": 0 if data.tokens is None else len(data.tokens),
              "utterances": 0 if data.mels is None else len(data.mels),
              "directions": score_latents(latents, groups), "ttt": ttt}
    result["mean_recall"] = mean_recall(result["directions"])
    if sizes is not None:
        result["folds"] = {"count": folds, "images": sizes}
        result["directions_folds"] = score_folds(latents, groups, sizes)
        result["directions_1k"] = mean_over_folds(result["directions_folds"])
    if ttt:
        adapted = adapted_latents(model, data, target, train["eval_batch_size"], **ttt_options)
        result["directions_ttt"] = score_latents(adapted, groups)
        result["mean_recall_ttt"] = mean_recall(result["directions_ttt"])
        result["ttt_settings"] = model.ttt_settings()
    context = EvaluationContext(run, split, data, sources.shards, sources.store.config, target, train, {"beams": beams})
    return distributed.on_main(lambda: _finish(model, context, result), "writing the evaluation")


def _finish(model, context: EvaluationContext, result: dict) -> dict:
    """The family's extra sections, then the files: its own first, eval-<split>.json (the summary) last."""
    extras = model.evaluation_extras(context)
    if extras is not None:
        result.update(extras.result)
    files = [(context.run / name, lambda path, lines=lines: write_jsonl(path, lines))
             for name, lines in (extras.files.items() if extras else ())]
    files.append((context.run / f"eval-{context.split}.json", lambda path: write_json(path, result)))
    for path, write in files:
        try:
            write(path)
        except OSError as error:
            raise TrimodalError(f"cannot write {path}: {error.strerror or error}") from error
    return result


def check_ttt_options(model, family: str, options: dict) -> None:
    """Before any work: the family has test-time training, and the options given are its own."""
    if not model.has_test_time_training:
        raise ConfigError(f"model family {family!r} has no test-time training; --ttt works for "
                          f"{', '.join(families_where(lambda family: family.has_test_time_training))}")
    foreign = [name for name in options if name not in model.ttt_options]
    if foreign:
        settings = ", ".join(name for name in model.ttt_settings() if name != "loss")
        raise ConfigError(f"{', '.join(f'--ttt-{name}' for name in foreign)}: {family!r} takes no such option; its "
                          f"test-time training uses the run's settings ({settings}; set in its config)")
    problems = model.check_ttt_options(options)
    if problems:
        raise ConfigError("; ".join(problems))
