"""Model registry: families are built by name from a config's flat [model] table.

Each family is a package here (`mmn/`, `nlmm/`, …) that registers its builder with `@register_model`; its
model implements the contract in `family.py`. Adding or deleting a family touches its folder and
`FAMILIES` below, nothing else.
"""

from __future__ import annotations

import importlib
import inspect
import typing
from collections.abc import Callable

from trimodal.errors import ConfigError

FAMILIES = ("bitmar", "cman", "dualloop", "mmn", "nlmm")  # the packages that register themselves

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


def family_class(name: str) -> type:
    """The model class family `name`'s builder returns (its return annotation)."""
    _load_families()
    return typing.get_type_hints(_BUILDERS[name])["return"]


def families_where(test) -> list[str]:
    """The families whose model class passes `test` (e.g. `lambda family: family.has_test_time_training`)."""
    return [name for name in available_models() if test(family_class(name))]


def parameter_counts(model) -> tuple[int, int]:
    """(total, trainable) parameters."""
    parameters = list(model.parameters())
    return sum(p.numel() for p in parameters), sum(p.numel() for p in parameters if p.requires_grad)


def _load_families() -> None:
    for family in FAMILIES:  # each registers itself on import
        importlib.import_module(f"trimodal.training.models.{family}")
