"""What a loss can do, read once from its class when it is registered.

The harness used to find these out by duck typing the loss object wherever it needed one (the step, the
memory check, the DDP check, the gradient analysis); now `register` resolves them here and stores them on
the loss's spec, and every caller asks the spec.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LossCapabilities:
    """The forms a loss takes and what it holds, as the training and report code need them."""

    refs_form: bool  # takes the queries x gallery form (`losses._refs`): a cross-batch memory, DDP's split
    similarity_form: bool  # has forward_similarities(sims, labels): the report's gradient analysis
    splits_by_query: bool  # a mean of per-query terms: under torchrun each rank takes its own queries
    has_parameters: bool  # trainable parameters of its own (proxies): trained beside the model, one process


def resolve_capabilities(cls: type) -> LossCapabilities:
    """The capabilities of loss class `cls`; its own parameters are those of the loss built from its
    defaults. A class that is no nn.Module resolves to none, so the call contract can name the problem."""
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        return LossCapabilities(False, False, False, False)
    return LossCapabilities(
        refs_form=_takes_refs(cls),
        similarity_form=callable(getattr(cls, "forward_similarities", None)),
        splits_by_query=bool(getattr(cls, "splits_by_query", False)),
        has_parameters=_has_parameters(cls),
    )


def _takes_refs(cls: type[torch.nn.Module]) -> bool:
    """Whether forward names the queries x gallery arguments, or passes keywords on (a wrapper)."""
    parameters = inspect.signature(cls.forward).parameters
    passes_on = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    return passes_on or ("ref_embeddings" in parameters and "query_offset" in parameters)


def _has_parameters(cls: type[torch.nn.Module]) -> bool:
    """Whether the loss built from its defaults holds trainable parameters; building it leaves the global
    random state as it was, since registration may happen in the middle of a seeded run."""
    with torch.random.fork_rng(devices=[]):
        return any(True for _ in cls().parameters())
