"""Loss registry: every module in this package registers one loss, so dropping a file in makes it usable.

A loss is a `torch.nn.Module` called as `loss(embeddings[B, D], labels[B]) -> scalar`, where the embeddings
are already L2-normalised by the model's head. Each module declares beside its class the default parameters,
an Optuna search space over the constructor's keyword arguments, and the miner it uses (if any), and ends
with a `register(...)` call. See losses/README.md for a complete example.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["LossSpec", "available_losses", "get_loss", "get_spec", "register"]


@dataclass(frozen=True)
class LossSpec:
    """What the harness needs to build and tune one loss."""

    name: str
    cls: type[torch.nn.Module]
    defaults: dict[str, Any] = field(default_factory=dict)
    search_space: Callable[[Any], dict[str, Any]] | None = None  # (optuna.Trial) -> params
    miner: str | None = None  # human-readable name of the miner the loss uses, for reports

    def param_names(self) -> list[str]:
        """Keyword arguments the constructor accepts."""
        signature = inspect.signature(self.cls.__init__)
        return [
            p.name
            for p in signature.parameters.values()
            if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]


_REGISTRY: dict[str, LossSpec] = {}


def register(
    name: str,
    cls: type[torch.nn.Module],
    defaults: dict[str, Any],
    search_space: Callable[[Any], dict[str, Any]] | None = None,
    miner: str | None = None,
) -> LossSpec:
    """Add a loss under `name`; defaults must be constructor keyword arguments."""
    spec = LossSpec(name=name, cls=cls, defaults=dict(defaults), search_space=search_space, miner=miner)
    unknown = sorted(set(spec.defaults) - set(spec.param_names()))
    if unknown:
        raise ValueError(f"loss {name!r}: defaults {unknown} are not arguments of {cls.__name__}")
    existing = _REGISTRY.get(name)
    if existing is not None and existing.cls is not cls:
        raise ValueError(f"loss {name!r} is already registered by {existing.cls.__module__}")
    _REGISTRY[name] = spec
    return spec


def get_spec(name: str) -> LossSpec:
    """The registered spec for `name`, or a ValueError listing the known losses."""
    _discover()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; available: {', '.join(available_losses())}") from None


def get_loss(name: str, **params: Any) -> torch.nn.Module:
    """Build loss `name` from its defaults, overridden by `params`."""
    spec = get_spec(name)
    valid = spec.param_names()
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(
            f"loss {name!r} has no parameter {', '.join(map(repr, unknown))}; valid parameters: {', '.join(valid)}"
        )
    return spec.cls(**{**spec.defaults, **params})


def available_losses() -> list[str]:
    """Registry names of every loss module in this package."""
    _discover()
    return sorted(_REGISTRY)


_discovered = False


def _discover() -> None:
    """Import every public module of the package once; each registers itself on import."""
    global _discovered
    if _discovered:
        return
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_") and module.name != "introspect":
            importlib.import_module(f"{__name__}.{module.name}")
    _discovered = True
