"""Loss registry: every module in this package registers one loss, so dropping a file in makes it usable.

A loss is a `torch.nn.Module` called as `loss(embeddings[B, D], labels[B]) -> scalar`, where the embeddings
are already L2-normalised by the model's head. Its defaults live in the constructor's signature (every
argument has one), so a module declares only its Optuna search space over those arguments and the miner it
uses (if any), and ends with `register(name, cls, search_space, miner=...)`. See losses/README.md.

Every registered loss also takes the queries x gallery form, `loss(embeddings, labels, ref_embeddings,
ref_labels, query_offset)`: rows are queries, columns a retrieval set that holds the queries at `query_offset`
(a cross-batch memory, or the global batch under torchrun); see `losses._refs`. A loss whose value is a mean
of per-query terms sets `splits_by_query = True`, so ranks may each take their own queries. `register`
resolves what a loss can do once (`LossCapabilities`) and stores it on the spec, where the harness reads it.

Losses from outside this package join the same registry: a Python file anywhere, imported with
`load_loss_module(path)` (the CLI's `--loss-module`), or an installed package's entry point in the group
`smoothap_bench.losses` (a module that registers on import, or a callable that registers when called),
loaded with the package's own modules. Each outside loss is checked once, on a tiny random batch, before any
data is read; a broken one fails with a `LossModuleError` naming its source and the problem.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import pkgutil
import re
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from losses._capabilities import LossCapabilities, resolve_capabilities

__all__ = [
    "ENTRY_POINT_GROUP",
    "LossCapabilities",
    "LossModuleError",
    "LossSpec",
    "available_losses",
    "get_loss",
    "get_spec",
    "load_loss_module",
    "make_spec",
    "register",
    "resolve_loss_names",
]

ENTRY_POINT_GROUP = "smoothap_bench.losses"


@dataclass(frozen=True)
class LossSpec:
    """What the harness needs to build and tune one loss."""

    name: str
    cls: type[torch.nn.Module]
    capabilities: LossCapabilities  # resolved from `cls` by `make_spec`
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


def make_spec(
    name: str,
    cls: type[torch.nn.Module],
    search_space: Callable[[Any], dict[str, Any]] | None = None,
    miner: str | None = None,
) -> LossSpec:
    """The spec of loss class `cls`: its defaults from the signature (first: a missing default is named
    before the class is built), then its capabilities from the class."""
    defaults = _signature_defaults(name, cls)
    return LossSpec(name, cls, resolve_capabilities(cls), defaults, search_space, miner)


_REGISTRY: dict[str, LossSpec] = {}


def register(
    name: str,
    cls: type[torch.nn.Module],
    search_space: Callable[[Any], dict[str, Any]] | None = None,
    miner: str | None = None,
) -> LossSpec:
    """Add a loss under `name`, its defaults read from the signature of `cls` and its capabilities from the
    class (`make_spec`)."""
    if search_space is not None and not callable(search_space):
        raise TypeError(
            f"loss {name!r}: search_space must be a function (optuna.Trial) -> dict, got {search_space!r} "
            f"(defaults are read from the signature of {cls.__name__})"
        )
    spec = make_spec(name, cls, search_space, miner)
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
        raise ValueError(
            f"unknown loss {name!r}; available: {', '.join(available_losses())} (a loss from outside this "
            f"package needs --loss-module FILE, or an installed {ENTRY_POINT_GROUP!r} entry point)"
        ) from None


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
    """Registry names of every loss: this package's modules, entry points and loaded loss files."""
    _discover()
    return sorted(_REGISTRY)


# The losses of the design's comparison, and those after Smooth-AP (issue 26) that only run when asked for.
DESIGN_LOSSES = ("smooth_ap", "triplet", "contrastive", "multi_similarity", "fastap", "blackbox_ap")
LATER_LOSSES = ("roadmap", "recall_at_k", "pnp")
LOSS_SETS = {"design": DESIGN_LOSSES, "extended": DESIGN_LOSSES + LATER_LOSSES}


def resolve_loss_names(names: list[str] | None) -> list[str]:
    """The registry names a `--losses` list stands for: a named set of `LOSS_SETS` (`extended`: the six
    design losses and the later ones) expands in place, duplicates keep their first place. No names: every
    registered loss but the later ones, so the main job keeps its six (and any outside losses) by default.
    Names are not checked here: `get_spec` does that, listing the known ones."""
    if not names:
        return [name for name in available_losses() if name not in LATER_LOSSES]
    resolved: list[str] = []
    for name in names:
        for member in LOSS_SETS.get(name, (name,)):
            if member not in resolved:
                resolved.append(member)
    return resolved


_discovered = False


def _discover() -> None:
    """Import every public module of the package once (each registers itself on import), then load the
    installed packages' entry points."""
    global _discovered
    if _discovered:
        return
    _discovered = True  # before loading: an entry point that asks for the registry must not re-enter
    try:
        for module in pkgutil.iter_modules(__path__):
            if not module.name.startswith("_") and module.name != "introspect":
                importlib.import_module(f"{__name__}.{module.name}")
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            _load_entry_point(entry_point)
    except BaseException:
        _discovered = False
        raise


class LossModuleError(ValueError):
    """A loss from outside the package cannot be used: the message names the file or entry point and why."""


_LOADED_FILES: dict[Path, list[str]] = {}  # resolved path -> names it registered: a file loads once


def load_loss_module(path: str | Path) -> list[str]:
    """Import the loss file `path` (anywhere on disk) under a unique module name and return the names it
    registered, each checked against the call contract. Loading the same file again returns the same names."""
    _discover()  # the package's and entry points' names first, so that a clash is caught
    file = Path(path).expanduser().resolve()
    if file in _LOADED_FILES:
        return _LOADED_FILES[file]
    if not file.is_file():
        raise LossModuleError(f"loss module {path}: no such file")
    try:
        compile(file.read_bytes(), str(file), "exec")
    except SyntaxError as error:
        raise LossModuleError(f"{file}: syntax error at line {error.lineno}: {error.msg}") from None
    stem = re.sub(r"\W", "_", file.stem)
    module_name = f"_smoothap_loss_{stem}_{hashlib.sha1(str(file).encode()).hexdigest()[:10]}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # as `import` does: dataclasses and pickling look the module up here
    try:
        names = _registered_by(str(file), lambda: spec.loader.exec_module(module), file)
    except LossModuleError:
        del sys.modules[module_name]
        raise
    _LOADED_FILES[file] = names
    return names


def _load_entry_point(entry_point: importlib.metadata.EntryPoint) -> list[str]:
    """An entry point names a module (importing it registers) or a callable (calling it registers)."""
    dist = getattr(entry_point.dist, "name", None)
    source = f"entry point {entry_point.name} = {entry_point.value}" + (f" (package {dist})" if dist else "")

    def load() -> None:
        loaded = entry_point.load()
        if not inspect.ismodule(loaded):
            if not callable(loaded):
                raise TypeError(f"{loaded!r} is neither a module nor a callable")
            loaded()

    return _registered_by(source, load)


def _registered_by(source: str, load: Callable[[], Any], file: Path | None = None) -> list[str]:
    """Run `load` and return the names it registered, after checking each one; on any failure the registry
    is restored and a LossModuleError names `source` (and the line in `file` that failed)."""
    before = dict(_REGISTRY)
    try:
        try:
            load()
        except Exception as error:
            lines = [f.lineno for f in traceback.extract_tb(error.__traceback__) if f.filename == str(file)]
            where = f" (line {lines[-1]})" if lines else ""
            raise LossModuleError(f"{source}{where}: {type(error).__name__}: {error}") from error
        names = [name for name in _REGISTRY if name not in before]
        if not names:
            raise LossModuleError(
                f"{source}: registers no loss; end it with losses.register(name, LossClass, search_space)"
            )
        for name in names:
            check_call_contract(_REGISTRY[name], source)
    except LossModuleError:
        _REGISTRY.clear()
        _REGISTRY.update(before)
        raise
    return names


def check_call_contract(spec: LossSpec, source: str) -> None:
    """Build the loss from its defaults and call it on 16 random unit embeddings of 4 classes: it must be an
    nn.Module whose forward takes (embeddings, labels) and returns a finite scalar that depends on them."""
    problem = f"{source}: loss {spec.name!r}"
    if not (isinstance(spec.cls, type) and issubclass(spec.cls, torch.nn.Module)):
        shown = getattr(spec.cls, "__qualname__", repr(spec.cls))
        raise LossModuleError(f"{problem}: {shown} is not a torch.nn.Module subclass")
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(16, 8, generator=generator), dim=1)
    embeddings.requires_grad_(True)
    labels = torch.arange(4).repeat_interleave(4)
    try:
        inspect.signature(spec.cls.forward).bind(None, embeddings, labels)
    except TypeError as error:
        raise LossModuleError(f"{problem}: forward must take (embeddings, labels): {error}") from None
    with torch.random.fork_rng(devices=[]):
        try:
            value = spec.cls()(embeddings, labels)
        except Exception as error:
            raise LossModuleError(
                f"{problem}: calling it on a batch of 16 embeddings raised {type(error).__name__}: {error}"
            ) from error
    if not (isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point()):
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise LossModuleError(f"{problem}: forward must return a scalar float tensor, got {shape}")
    if not torch.isfinite(value):
        raise LossModuleError(f"{problem}: returned {value.item()} on a batch of 16 random unit embeddings")
    if not value.requires_grad:
        raise LossModuleError(f"{problem}: its value does not depend on the embeddings (no gradient)")
