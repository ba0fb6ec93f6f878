"""`mm eval`: a trained run's checkpoint evaluated by retrieval on a split, optionally with TTT."""

from __future__ import annotations

import tomllib
from pathlib import Path

from trimodal.atomic import write_json, write_jsonl
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
    """Evaluate and write `run/eval-<split>.json`; returns what was written.

    With `folds`, the split's images (in shard order) are also cut into that many consecutive folds, as
    equal as possible with the first ones one larger, and every direction is scored within each fold:
    "directions_folds" per fold and "directions_1k" their mean (COCO's 1k protocol for 5 folds of its
    5,000 Karpathy test images). Folds apply to the plain evaluation only, not to TTT.

    A family that generates (`generate`) is also scored as a captioner (`beams` 1 is greedy, 3 the default): "captioning"
    in the result, every caption in `run/captions-<split>.jsonl`, memory slot use in `run/plots`."""
    if beams < 1:
        raise ConfigError(f"--beams must be at least 1 (got {beams})")
    run = Path(run)
    model, resolved, target = load_run(run, checkpoint, device)
    family = resolved["model"]["name"]
    shards = Path(shards or resolved["data"]["shards"])
    features = Path(features or resolved["data"]["features"])
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
    captions = None
    if hasattr(model, "generate") and data.images is not None and data.tokens is not None:
        captioning, captions = caption_evaluation(model, data, run, split, shards, store_config, target, beams,
                                                  int(train["batch_size"]))
        result.update(captioning)
    writes = [(run / f"eval-{split}.json", lambda path: write_json(path, result))]  # the summary last
    if captions is not None:
        writes.insert(0, (run / result["captioning"]["captions_file"], lambda path: write_jsonl(path, captions)))
    for path, write in writes:
        try:
            write(path)
        except OSError as error:
            raise TrimodalError(f"cannot write {path}: {error.strerror or error}") from error
    return result


def caption_evaluation(model, data, run: Path, split: str, shards: Path, store_config: dict, device,
                       beams: int, episode_size: int) -> tuple[dict, list[dict]]:
    """Captions for every image of the split, scored: the result's "captioning" and "memory", and the
    lines of `captions-<split>.jsonl` (key, generated, references)."""
    from trimodal.features.text import OpenClipTokenizer
    from trimodal.training.captioning import (METRICS_SOURCE, caption_scores, generate_captions, slot_access,
                                              split_references)
    from trimodal.training.plots import plot_slot_access

    references = split_references(shards, split)
    captions, weights = generate_captions(model, data.images, OpenClipTokenizer(store_config["text"]["tokenizer"]),
                                          device, beams=beams, episode_size=episode_size)
    generated = dict(zip(data.keys, captions))
    access = slot_access(weights)
    if bool(model.memory_trained):
        (run / "plots").mkdir(exist_ok=True)
        plot_slot_access(access["mean_abs_weight"], run / "plots" / f"memory-slots-{split}.png",
                         f"memory slot access, {split} ({len(data.keys)} reads)")
    lines = [{"key": key, "generated": generated[key], "references": references.get(key, [])} for key in data.keys]
    return {"captioning": {**caption_scores(references, generated), "images": len(captions), "beams": beams,
                           "captions_file": f"captions-{split}.jsonl", "metrics_from": METRICS_SOURCE},
            "memory": {"used": bool(model.memory_trained), "episode_size": episode_size, **access}}, lines


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
