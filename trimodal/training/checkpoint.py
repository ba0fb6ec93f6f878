"""Checkpoints: weights as safetensors, the rest (optimizers, epoch, step, data position, random states) in a
weights-only torch file.

A run's `checkpoints/` folder:

    step-00000120.safetensors  step-00000120.state.pt   the `train.keep_checkpoints` latest, each whole
    last.safetensors                                     the newest weights (what `mm eval` reads)
    last.state.pt                                        names the step file its weights are in
    best.safetensors                                     the best validation's weights

`save_checkpoint` writes the step files, then `last.safetensors`, then `last.state.pt`, each atomically
(a temporary name, then a rename): until the new `last.state.pt` is in place, the previous one names
the previous step files, which are removed only afterwards. A stop at any moment leaves a whole
checkpoint to resume from.
"""

from __future__ import annotations

import os
import re
import shutil
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


LAST_STATE = "last.state.pt"
_STEP_FILE = re.compile(r"step-(\d{8,})\.safetensors")


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def save_checkpoint(folder: Path, model: torch.nn.Module, state: dict, *, keep: int, best: bool = False) -> None:
    """The model and `state` (which holds "epoch" and "step") as the run's newest checkpoint; `best` also
    makes these weights `best.safetensors`. Keeps the `keep` newest step checkpoints."""
    folder = Path(folder)
    name = step_name(state["step"])
    weights = folder / f"{name}.safetensors"
    save_weights(model, weights, {"epoch": state["epoch"], "step": state["step"]})
    state = {**state, "weights": weights.name}
    save_state(folder / f"{name}.state.pt", state)
    if best:
        _link(weights, folder / "best.safetensors")
    _link(weights, folder / "last.safetensors")
    # The same bytes as the step's state: linked, not serialised twice (that halved the ~0.3 s a tiny
    # checkpoint's two states took on the 2-core CPU). Last, so it names weights already in place.
    _link(folder / f"{name}.state.pt", folder / LAST_STATE)
    _prune(folder, keep, newest=weights.name)


def read_checkpoint(folder: Path) -> tuple[dict, Path]:
    """The newest checkpoint's state and the weights file it names (runs written before step files:
    `last.safetensors`)."""
    state = load_state(Path(folder) / LAST_STATE)
    name = state.get("weights", "last.safetensors")
    if not isinstance(name, str) or not (_STEP_FILE.fullmatch(name) or name == "last.safetensors"):
        raise TrimodalError(f"{Path(folder) / LAST_STATE} names weights {name!r}, not a step file of this folder")
    return state, Path(folder) / name


def _link(source: Path, target: Path) -> None:
    """`target` becomes the same bytes as `source`, atomically: a hard link (no copy) where the file system
    has them, else a copy."""
    try:
        with atomic_path(target) as temporary:
            temporary.unlink(missing_ok=True)  # left by a run stopped here
            try:
                os.link(source, temporary)
            except OSError:
                shutil.copyfile(source, temporary)
    except OSError as error:
        raise _unwritable(target, error) from error


def _prune(folder: Path, keep: int, newest: str) -> None:
    found = sorted((int(m.group(1)), m.group(0)) for p in folder.iterdir() if (m := _STEP_FILE.fullmatch(p.name)))
    for _, name in found[: max(0, len(found) - max(1, keep))]:
        if name != newest:
            (folder / name).unlink(missing_ok=True)
            (folder / name.replace(".safetensors", ".state.pt")).unlink(missing_ok=True)
