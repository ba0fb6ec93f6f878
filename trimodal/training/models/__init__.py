"""Model registry: families are built by name from a config's flat [model] table."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable

from trimodal.errors import ConfigError

_BUILDERS: dict[str, Callable] = {}


def register_model(name: str):
    def decorate(builder: Callable) -> Callable:
        _BUILDERS[name] = builder
        return builder

    return decorate


def available_models() -> list[str]:
    _load_families()
    return sorted(_BUILDERS)


def build_model(name: str, **kwargs):
    """Build model `name`; every unknown or mistyped argument is reported at once."""
    _load_families()
    if name not in _BUILDERS:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(sorted(_BUILDERS))}")
    builder = _BUILDERS[name]
    parameters = inspect.signature(builder).parameters
    unknown = sorted(set(kwargs) - set(parameters))
    if unknown:
        raise ConfigError(f"model {name!r} has no setting {', '.join(unknown)}; "
                          f"its settings: {', '.join(p for p in parameters)}")
    return builder(**kwargs)


def model_defaults(name: str) -> dict:
    _load_families()
    return {k: p.default for k, p in inspect.signature(_BUILDERS[name]).parameters.items()
            if p.default is not inspect.Parameter.empty}


def family_has(attribute: str) -> list[str]:
    """The families whose model class defines `attribute` (e.g. "ttt_settings")."""
    _load_families()
    return sorted(name for name in _BUILDERS if family_attribute(name, attribute, _ABSENT) is not _ABSENT)


_ABSENT = object()


def family_attribute(name: str, attribute: str, default=None):
    """A class attribute of family `name`'s model (e.g. its "loss_names"), or `default`."""
    _load_families()
    return getattr(typing.get_type_hints(_BUILDERS[name]).get("return"), attribute, default)


def model_inputs(model) -> dict:
    """What `model` reads from the feature store (`trimodal.training.data.DEFAULT_INPUTS`): its own
    `store_inputs()`, else image tokens for models built with `image_tokens`."""
    custom = getattr(model, "store_inputs", None)
    if custom is not None:
        return custom()
    return {"image": "tokens" if getattr(model, "image_tokens", False) else "embedding"}


def parameter_counts(model) -> tuple[int, int]:
    """(total, trainable) parameters."""
    parameters = list(model.parameters())
    return sum(p.numel() for p in parameters), sum(p.numel() for p in parameters if p.requires_grad)


def _load_families() -> None:
    from trimodal.training.models import bitmar, cman, dualloop, mmn, nlmm  # noqa: F401  (each registers itself)
