"""Checkpoints: weights as safetensors, the rest (optimizers, epoch, step, data streams) in a weights-only torch file."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from trimodal.atomic import atomic_path
from trimodal.errors import TrimodalError


def save_weights(model: torch.nn.Module, path: Path, metadata: dict | None = None) -> None:
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as temporary:
            save_file(state, str(temporary), metadata={k: str(v) for k, v in (metadata or {}).items()})
    except (OSError, SafetensorError) as error:  # a full disk, an unwritable folder
        raise _unwritable(path, error) from error


def load_weights(model: torch.nn.Module, path: Path) -> None:
    if not path.is_file():
        raise TrimodalError(f"checkpoint {path} does not exist")
    try:
        state = load_file(str(path))
    except Exception as error:  # safetensors raises its own types for damaged files
        raise TrimodalError(f"cannot read checkpoint {path}: {error}") from error
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise TrimodalError(f"{path} does not fit this model: {len(missing)} missing, {len(unexpected)} unexpected "
                            f"tensors (e.g. {(missing or unexpected)[0]})")


def save_state(path: Path, state: dict) -> None:
    """Optimizers and progress; loadable with `torch.load(weights_only=True)`."""
    try:
        with atomic_path(path) as temporary:
            torch.save(state, temporary)
    except (OSError, RuntimeError) as error:  # torch.save reports a failed write as a RuntimeError
        raise _unwritable(path, error) from error


def _unwritable(path: Path, error: Exception) -> TrimodalError:
    reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
    return TrimodalError(f"cannot write {path}: {reason}; the previous checkpoint is kept (written atomically), "
                         "free space and resume with --resume")


def load_state(path: Path) -> dict:
    if not path.is_file():
        raise TrimodalError(f"{path} does not exist: nothing to resume from")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types
        raise TrimodalError(f"cannot read training state {path}: {error}") from error
