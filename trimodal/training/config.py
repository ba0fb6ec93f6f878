"""Run configuration: dataclass defaults -> TOML config file -> `key=value` overrides, validated at once."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from trimodal.distributed import BACKENDS
from trimodal.errors import ConfigError
from trimodal.training.models import available_models, family_class, model_defaults
from trimodal.training.settings import TrainConfig

SECTIONS = ("model", "train")


def shipped_config(name: str) -> Path:
    """A config shipped with trimodal (`configs/<name>.toml`, in the wheel or the repository)."""
    package = Path(__file__).resolve().parent.parent
    for folder in (package / "configs", package.parent / "configs"):
        if (folder / f"{name}.toml").is_file():
            return folder / f"{name}.toml"
    raise ConfigError(f"no shipped config named {name!r}")


@dataclass
class RunConfig:
    model_name: str
    model: dict
    train: TrainConfig

    def to_dict(self) -> dict:
        return {"model": {"name": self.model_name, **self.model}, "train": asdict(self.train)}


def featurize_line(path: Path) -> list[str]:
    """The extra `mm featurize` options a config's first line names (`# featurize: --image-tokens …`), or []."""
    import shlex

    try:
        first = Path(path).read_text(encoding="utf-8").splitlines()[:1]
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error}") from error
    if first and first[0].startswith("# featurize:"):
        return shlex.split(first[0].removeprefix("# featurize:"))
    return []


def parse_override(text: str) -> tuple[str, str, object]:
    """`train.epochs=5` -> ("train", "epochs", 5); values are read as TOML, else kept as strings."""
    key, equals, raw = text.partition("=")
    section, dot, name = key.strip().partition(".")
    if not equals or not dot or not name:
        raise ConfigError(f"override {text!r} is not section.key=value (e.g. train.epochs=5)")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, name, value


def load_config(path: Path, overrides: list[str] = ()) -> RunConfig:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"cannot read config {path}: {error}") from error
    problems = [f"unknown section [{s}] (sections: {', '.join(SECTIONS)})" for s in raw if s not in SECTIONS]
    for override in overrides:
        section, name, value = parse_override(override)
        raw.setdefault(section, {})[name] = value
        if section not in SECTIONS:
            problems.append(f"override {override!r}: unknown section {section!r}")

    model = dict(raw.get("model", {}))
    name = model.pop("name", None)
    if name not in available_models():
        problems.append(f"[model] name must be one of {', '.join(available_models())} (got {name!r})")
    else:
        defaults = model_defaults(name)
        for key, value in model.items():
            if key not in defaults:
                problems.append(f"[model] {key}: model {name!r} has no such setting")
            elif not _same_type(defaults[key], value):
                problems.append(f"[model] {key} = {value!r}: expected {type(defaults[key]).__name__}")

    train_fields = {f.name: f for f in fields(TrainConfig)}
    defaults = TrainConfig()
    train_values = {}
    for key, value in raw.get("train", {}).items():
        if key not in train_fields:
            problems.append(f"[train] {key}: no such setting")
        elif not _same_type(getattr(defaults, key), value):
            problems.append(f"[train] {key} = {value!r}: expected {type(getattr(defaults, key)).__name__}")
        else:
            train_values[key] = float(value) if isinstance(getattr(defaults, key), float) else value
    if train_values.get("stages"):
        stage_problems = _check_stages(train_values["stages"], name)
        problems += stage_problems
        if not stage_problems:
            total = sum(stage["epochs"] for stage in train_values["stages"])
            limit = train_values.get("epochs", total)
            if limit > total:
                problems.append(f"[train] epochs = {limit} is more than the stages' {total} (set each stage's epochs)")
            else:
                train_values["stages"] = _cut_stages(train_values["stages"], limit)
                train_values["epochs"] = limit
    train = TrainConfig(**train_values)
    problems += _check_ranges(train)
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    return RunConfig(name, model, train)


def _cut_stages(stages: list[dict], epochs: int) -> list[dict]:
    """The stages in order, stopped after `epochs` in all (`train.epochs=1` runs the first stage's first)."""
    kept, left = [], epochs
    for stage in stages:
        if left <= 0:
            break
        kept.append({**stage, "epochs": min(stage["epochs"], left)})
        left -= stage["epochs"]
    return kept


def _check_stages(stages: list, family: str | None) -> list[str]:
    known = family_class(family).loss_names if family in available_models() else None
    if stages and family in available_models() and known is None:
        return [f"[[train.stages]]: model {family!r} does not train in stages (its loss is fixed)"]
    problems = []
    for number, stage in enumerate(stages, 1):
        where = f"[[train.stages]] #{number}"
        if not isinstance(stage, dict):
            problems.append(f"{where} must be a table")
            continue
        unknown = sorted(set(stage) - {"name", "epochs", "losses", "weights"})
        if unknown:
            problems.append(f"{where}: no setting {', '.join(unknown)} (settings: name, epochs, losses, weights)")
        if not isinstance(stage.get("name"), str):
            problems.append(f"{where}: name must be a string")
        epochs = stage.get("epochs")
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
            problems.append(f"{where}: epochs must be an integer of at least 1")
        losses = stage.get("losses")
        if not isinstance(losses, list) or not losses or not all(isinstance(loss, str) for loss in losses):
            problems.append(f"{where}: losses must be a non-empty list of loss names")
        elif known is not None and set(losses) - set(known):
            problems.append(f"{where}: unknown loss {', '.join(sorted(set(losses) - set(known)))} "
                            f"(model {family!r} has {', '.join(known)})")
        weights = stage.get("weights", {})
        if not isinstance(weights, dict) or not all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                                    for w in weights.values()):
            problems.append(f"{where}: weights must be a table of numbers by loss name")
        elif isinstance(losses, list) and set(weights) - set(losses):
            problems.append(f"{where}: weights name losses the stage does not train: "
                            f"{', '.join(sorted(set(weights) - set(losses)))}")
    return problems


def _same_type(default, value) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


LOGGERS = ("tensorboard", "wandb")


def _check_ranges(train: TrainConfig) -> list[str]:
    problems = []
    for key in ("epochs", "batch_size", "grad_accum", "log_every", "eval_batch_size"):
        if getattr(train, key) < 1:
            problems.append(f"[train] {key} must be at least 1")
    if train.batch_size < 2:
        problems.append("[train] batch_size must be at least 2 (contrastive loss)")
    if train.lr <= 0:
        problems.append("[train] lr must be positive")
    for key in ("max_steps", "data_streams", "checkpoint_every_steps", "checkpoint_every_minutes", "max_minutes",
                "attention_every"):
        if getattr(train, key) < 0:
            problems.append(f"[train] {key} must be 0 or more")
    if train.keep_checkpoints < 1:
        problems.append("[train] keep_checkpoints must be at least 1")
    if train.dist_timeout_s <= 0:
        problems.append("[train] dist_timeout_s must be positive")
    if train.dist_backend not in BACKENDS:
        problems.append(f"[train] dist_backend must be one of {', '.join(BACKENDS)} (got {train.dist_backend!r})")
    if not set(train.loggers) <= set(LOGGERS):
        problems.append(f"[train] loggers must name some of {', '.join(LOGGERS)} (got {train.loggers})")
    unknown = set(train.modalities) - {"image", "text", "audio"}
    if unknown or len(train.modalities) < 2:
        problems.append(f"[train] modalities must name at least two of image, text, audio (got {train.modalities})")
    return problems


def dump_toml(sections: dict[str, dict]) -> str:
    """A small TOML writer for flat tables of scalars, lists and inline tables (what run configs hold)."""
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items() if value is not None]
        lines.append("")
    return "\n".join(lines)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f'"{k}" = {_toml_value(v)}' for k, v in value.items()) + " }"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
