"""`mm eval`: a trained run's checkpoint evaluated by retrieval on a split, optionally with TTT."""

from __future__ import annotations

import tomllib
from pathlib import Path

from trimodal.atomic import write_json
from trimodal.errors import ConfigError, TrimodalError
from trimodal.features.image import resolve_device
from trimodal.training.checkpoint import load_weights
from trimodal.training.data import load_split
from trimodal.training.evaluate import (adapted_evaluation, embed_split, fold_sizes, mean_over_folds, mean_recall,
                                        score_folds, score_latents, split_groups)
from trimodal.training.models import build_model, model_inputs
from trimodal.training.trainer import CHECKPOINTS


def read_resolved_config(run: Path) -> dict:
    path = Path(run) / "config.resolved.toml"
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrimodalError(f"{run} is not a training run (no config.resolved.toml)") from None
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise TrimodalError(f"cannot read {path}: {error}") from error


def evaluate_run(run: Path, *, split: str = "test", checkpoint: str = "best", ttt: bool = False,
                 shards: Path | None = None, features: Path | None = None, device: str = "auto",
                 ttt_k: int | None = None, ttt_step: float | None = None, folds: int | None = None) -> dict:
    """Evaluate and write `run/eval-<split>.json`; returns what was written.

    With `folds`, the split's images (in shard order) are also cut into that many consecutive folds, as
    equal as possible with the first ones one larger, and every direction is scored within each fold:
    "directions_folds" per fold and "directions_1k" their mean (COCO's 1k protocol for 5 folds of its
    5,000 Karpathy test images). Folds apply to the plain evaluation only, not to TTT."""
    if checkpoint not in ("best", "last"):
        raise ConfigError(f"--checkpoint must be best or last (got {checkpoint!r})")
    run = Path(run)
    resolved = read_resolved_config(run)
    shards = Path(shards or resolved["data"]["shards"])
    features = Path(features or resolved["data"]["features"])
    model_settings = dict(resolved["model"])
    family = model_settings.pop("name")
    model = build_model(family, **model_settings)
    load_weights(model, run / CHECKPOINTS / f"{checkpoint}.safetensors")
    target = resolve_device(device)
    model.to(target)
    train = resolved["train"]
    from trimodal.training.config import TrainConfig
    from trimodal.training.trainer import max_audio_frames

    from trimodal.features.store import FeatureStore

    store_config = FeatureStore.open(features).config
    data = load_split(shards, features, split, train["modalities"],
                      max_audio_frames(TrainConfig(max_audio_seconds=float(train["max_audio_seconds"])), store_config),
                      model_inputs(model))
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
        check_ttt_options(model, family, ttt_k, ttt_step)
        result["directions_ttt"] = adapted_evaluation(model, data, target, train["eval_batch_size"],
                                                      k=ttt_k, step=ttt_step)
        result["mean_recall_ttt"] = mean_recall(result["directions_ttt"])
        result["ttt_settings"] = model.ttt_settings()
    write_json(run / f"eval-{split}.json", result)
    return result


def check_ttt_options(model, family: str, ttt_k: int | None, ttt_step: float | None) -> None:
    """Before any work: the family has test-time training, and the options given are its own."""
    if not hasattr(model, "ttt_settings"):
        raise ConfigError(f"model family {family!r} has no test-time training; --ttt works for {', '.join(ttt_families())}")
    if (ttt_k is not None or ttt_step is not None) and hasattr(model, "ttt_encode"):
        raise ConfigError(f"--ttt-k and --ttt-step are mmn's memory-write settings; {family!r} adapts with its "
                          "run's ttt_max_steps, ttt_eta and adapter_rank (set in its config)")
    if (ttt_k is not None and ttt_k < 1) or (ttt_step is not None and not 0 < ttt_step <= 1):
        raise ConfigError("--ttt-k must be at least 1 and --ttt-step in (0, 1]")


def ttt_families() -> list[str]:
    from trimodal.training.models import family_has

    return family_has("ttt_settings")
