"""Run configuration: dataclass defaults -> TOML config file -> `key=value` overrides, validated at once."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from trimodal.errors import ConfigError
from trimodal.training.models import available_models, model_defaults

SECTIONS = ("model", "train")


def shipped_config(name: str) -> Path:
    """A config shipped with trimodal (`configs/<name>.toml`, in the wheel or the repository)."""
    package = Path(__file__).resolve().parent.parent
    for folder in (package / "configs", package.parent / "configs"):
        if (folder / f"{name}.toml").is_file():
            return folder / f"{name}.toml"
    raise ConfigError(f"no shipped config named {name!r}")


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 5e-4  # peak learning rate
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05  # the cosine schedule ends at lr * min_lr_ratio
    grad_clip: float = 1.0
    grad_accum: int = 1
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    seed: int = 0
    num_workers: int = 2
    shuffle_buffer: int = 1000
    max_audio_seconds: float = 10.0  # longer utterances are cropped (randomly in training)
    modalities: list[str] = field(default_factory=lambda: ["image", "text", "audio"])
    loss_weights: dict[str, float] = field(default_factory=lambda: {"image-text": 1.0, "image-audio": 1.0, "text-audio": 1.0})
    val_split: str = "val"
    eval_batch_size: int = 256
    log_every: int = 10
    device: str = "auto"


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
    train = TrainConfig(**train_values)
    problems += _check_ranges(train)
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    return RunConfig(name, model, train)


def _same_type(default, value) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def _check_ranges(train: TrainConfig) -> list[str]:
    problems = []
    for key in ("epochs", "batch_size", "grad_accum", "log_every", "eval_batch_size"):
        if getattr(train, key) < 1:
            problems.append(f"[train] {key} must be at least 1")
    if train.batch_size < 2:
        problems.append("[train] batch_size must be at least 2 (contrastive loss)")
    if train.lr <= 0:
        problems.append("[train] lr must be positive")
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
