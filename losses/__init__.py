"""Loss registry: every module in this package registers one loss, so dropping a file in makes it usable.

A loss is a `torch.nn.Module` called as `loss(embeddings[B, D], labels[B]) -> scalar`, where the embeddings
are already L2-normalised by the model's head. Its defaults live in the constructor's signature (every
argument has one), so a module declares only its Optuna search space over those arguments and the miner it
uses (if any), and ends with `register(name, cls, search_space, miner=...)`. See losses/README.md.
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
    defaults: dict[str, Any] = field(default_factory=dict)  # keyword -> default, from the signature
    search_space: Callable[[Any], dict[str, Any]] | None = None  # (optuna.Trial) -> params
    miner: str | None = None  # human-readable name of the miner the loss uses, for reports

    def param_names(self) -> list[str]:
        """Keyword arguments the constructor accepts."""
        return [p.name for p in _keyword_parameters(self.cls)]


def _keyword_parameters(cls: type[torch.nn.Module]) -> list[inspect.Parameter]:
    """The constructor's parameters that can be passed by keyword (not *args, **kwargs or positional-only)."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p for p in inspect.signature(cls).parameters.values() if p.kind in kinds]


def _signature_defaults(name: str, cls: type[torch.nn.Module]) -> dict[str, Any]:
    """The constructor's keyword defaults: the single place a loss states them, so `get_loss(name)` with
    no parameters builds exactly `cls()`. A parameter without a default is an error naming it."""
    defaults = {}
    for param in _keyword_parameters(cls):
        if param.default is param.empty:
            raise ValueError(
                f"loss {name!r}: parameter {param.name!r} of {cls.__name__} has no default; the registry "
                "reads every default from the constructor's signature"
            )
        defaults[param.name] = param.default
    return defaults


_REGISTRY: dict[str, LossSpec] = {}


def register(
    name: str,
    cls: type[torch.nn.Module],
    search_space: Callable[[Any], dict[str, Any]] | None = None,
    miner: str | None = None,
) -> LossSpec:
    """Add a loss under `name`, its defaults read from the signature of `cls`."""
    if search_space is not None and not callable(search_space):
        raise TypeError(
            f"loss {name!r}: search_space must be a function (optuna.Trial) -> dict, got {search_space!r} "
            f"(defaults are read from the signature of {cls.__name__})"
        )
    spec = LossSpec(name, cls, _signature_defaults(name, cls), search_space, miner)
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
            f"loss {name!r} has no parameter {', '.join(map(repr, unknown))}; "
            f"valid parameters: {', '.join(valid)}"
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
