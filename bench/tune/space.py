"""Search spaces: a loss's own space plus `tune.shared_space`, drawn as config overrides.

A trial is a set of dotted config keys (`loss.params.temperature`, `optim.lr`) applied to the experiment, so
what Optuna tunes and what the run trains with can never disagree.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import optuna
from optuna.distributions import distribution_to_json

import losses as loss_registry
from bench.config import Experiment, check_search_range, experiment_from_dict, set_path
from bench.tune.edges import WidenedTrial

# settings that may differ between the trials of one study without making them incomparable
# (`tune.widen` changes the search space, which the study audits on its own)
UNFINGERPRINTED = (
    "tune.trials",
    "tune.final_seeds",
    "tune.final_epochs",
    "tune.storage",
    "tune.widen",
    "tracking.",
)


def with_overrides(exp: Experiment, overrides: dict[str, Any]) -> Experiment:
    """A copy of `exp` with dotted keys (`optim.lr`, `loss.params.margin`) set; unknown keys raise
    ConfigError."""
    raw = exp.to_dict()
    for key, value in overrides.items():
        set_path(raw, key, value)
    return experiment_from_dict(raw)


def for_loss(exp: Experiment, loss: str) -> Experiment:
    """`exp` training `loss`; the config's fixed `loss.params` belong to its own loss and are kept only for
    it."""
    if loss == exp.loss.name:
        return exp
    return with_overrides(exp, {"loss.name": loss, "loss.params": {}})


def suggest_shared(trial: optuna.Trial, shared_space: dict[str, Any]) -> dict[str, Any]:
    """Suggest each `tune.shared_space` entry (int when both ends are ints); the Optuna parameter is named by
    the dotted config key. Entries are checked by `bench.config.check_search_range`."""
    values: dict[str, Any] = {}
    for key, spec in shared_space.items():
        check_search_range(f"tune.shared_space.{key}", spec)
        if "choices" in spec:
            values[key] = trial.suggest_categorical(key, spec["choices"])
            continue
        low, high, log = spec["low"], spec["high"], bool(spec.get("log", False))
        if all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)):
            values[key] = trial.suggest_int(key, low, high, step=int(spec.get("step", 1)), log=log)
            continue
        step = float(spec["step"]) if spec.get("step") is not None else None
        values[key] = trial.suggest_float(key, float(low), float(high), log=log, step=step)
    return values


def suggest_overrides(trial: optuna.Trial, exp: Experiment) -> dict[str, Any]:
    """The trial's config overrides: the loss's own search space as `loss.params.<name>` (with the ranges
    `tune.widen` replaces for this loss), then shared entries."""
    spec = loss_registry.get_spec(exp.loss.name)
    overrides: dict[str, Any] = {}
    if spec.search_space is not None:
        widened = exp.tune.widen.get(exp.loss.name)
        space = spec.search_space(WidenedTrial(trial, widened) if widened else trial)
        overrides.update({f"loss.params.{k}": v for k, v in space.items()})
    overrides.update(suggest_shared(trial, exp.tune.shared_space))
    return overrides


def describe_space(exp: Experiment) -> dict[str, str]:
    """The search space as Optuna distribution JSON, recorded in the study so budgets and spaces can be
    audited.

    Drawing one probe point also checks every key and value against the config before any trial starts.
    """
    probe = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = probe.ask()
    with_overrides(exp, suggest_overrides(trial, exp))
    return {name: distribution_to_json(dist) for name, dist in sorted(trial.distributions.items())}


def recipe_fingerprint(exp: Experiment, space: dict[str, Any]) -> str:
    """Hash of the fixed settings every trial of a study shares (all but the tuned keys, budget and
    stores)."""
    tuned = set(space) | {f"loss.params.{name}" for name in space}
    skip = (*UNFINGERPRINTED, "train.checkpoint_dir")
    fixed = {k: v for k, v in exp.flat().items() if k not in tuned and not k.startswith(skip)}
    return hashlib.sha256(json.dumps(fixed, sort_keys=True, default=str).encode()).hexdigest()[:16]
