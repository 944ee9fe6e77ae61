"""Search ranges that cap a loss: is a study's best value at the edge of its range, and what is the range
widened on that side.

A best value within `EDGE_FRACTION` of either end of a numeric range (measured on the log scale for a
log-scaled parameter) means the optimum may lie outside it, and the comparison may understate that loss.
Widening extends only the side that was hit: by a factor on the log scale, or by (factor - 1) range widths on
a linear one, never across zero for a range that started at or above it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import optuna
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

EDGE_FRACTION = 0.05  # of the range's width (log width for log-scaled parameters)


@dataclass(frozen=True)
class EdgeHit:
    """A tuned parameter whose best value sits at one end of its range."""

    param: str
    value: float
    low: float
    high: float
    log: bool
    side: Literal["low", "high"]

    def describe(self) -> str:
        scale = "log " if self.log else ""
        return (
            f"{self.param}={self.value:.4g} at the {self.side} edge of its {scale}range "
            f"[{self.low:g}, {self.high:g}]"
        )


def position_in_range(value: float, low: float, high: float, log: bool) -> float:
    """Where `value` lies between `low` (0) and `high` (1), on the log scale for a log-scaled range."""
    scale = math.log if log else float
    return (scale(value) - scale(low)) / (scale(high) - scale(low))


def edge_hits(trial: FrozenTrial, fraction: float = EDGE_FRACTION) -> list[EdgeHit]:
    """The numeric parameters of `trial` (a study's best) within `fraction` of an end of their range."""
    hits = []
    for name, dist in sorted(trial.distributions.items()):
        if not isinstance(dist, FloatDistribution | IntDistribution) or dist.high == dist.low:
            continue
        value = float(trial.params[name])
        where = position_in_range(value, dist.low, dist.high, dist.log)
        side = "low" if where <= fraction else "high" if where >= 1 - fraction else None
        if side is not None:
            hits.append(EdgeHit(name, value, float(dist.low), float(dist.high), dist.log, side))
    return hits


def study_edge_hits(study: optuna.Study, fraction: float = EDGE_FRACTION) -> list[EdgeHit]:
    """Edge hits of the study's best COMPLETE trial; none for a study without one."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return edge_hits(max(complete, key=lambda t: t.value), fraction) if complete else []


def widened_range(hit: EdgeHit, factor: float) -> tuple[float, float]:
    """The range of `hit` extended on the side it hit: x factor on a log scale, (factor - 1) widths
    linearly."""
    if factor <= 1:
        raise ValueError(f"--widen factor must be greater than 1, got {factor}")
    low, high = hit.low, hit.high
    if hit.log:
        return (low / factor, high) if hit.side == "low" else (low, high * factor)
    extra = (high - low) * (factor - 1)
    if hit.side == "high":
        return low, high + extra
    return (max(low - extra, 0.0) if low >= 0 else low - extra), high


def widened_ranges(hits: list[EdgeHit], factor: float) -> dict[str, list[float]]:
    """{param: [low, high]} for every hit, as `tune.widen` holds them for one loss."""
    return {hit.param: list(widened_range(hit, factor)) for hit in hits}


class WidenedTrial:
    """An Optuna trial whose numeric suggestions use replaced ranges for the named parameters.

    A loss's `search_space(trial)` is code; passing it this proxy changes its ranges without editing it.
    """

    def __init__(self, trial: optuna.Trial, ranges: dict[str, Any]) -> None:
        self._trial, self._ranges = trial, ranges

    def suggest_float(self, name: str, low: float, high: float, **kwargs: Any) -> float:
        low, high = self._ranges.get(name, (low, high))
        return self._trial.suggest_float(name, float(low), float(high), **kwargs)

    def suggest_int(self, name: str, low: int, high: int, **kwargs: Any) -> int:
        low, high = self._ranges.get(name, (low, high))
        return self._trial.suggest_int(name, math.floor(low), math.ceil(high), **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trial, name)
