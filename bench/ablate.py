"""Ablations of the paper's kind: a grid over one or two config parameters, each cell trained over several
seeds with everything else fixed.

Each run is tagged `stage=ablation` and records `ablation.param` / `ablation.value` (and `ablation.param2` /
`ablation.value2`) as tags and params. A cell that already has a FINISHED run in MLflow with the same loss,
swept values, seed and fixed settings (a fingerprint of the rest of the config) is skipped, and an interrupted
one resumes from its checkpoint, so re-running the command finishes the grid.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import yaml

from bench import layout
from bench.config import ConfigError, Experiment, LossConfig
from bench.data import DatasetBundle, load_dataset
from bench.train import default_checkpoint_path, holds_unfinished_run, train_and_evaluate
from bench.tune import format_seconds, with_overrides
from bench.vocabulary import STAGE, TEST_MAP_AT_R, VAL_MAP_AT_R, Stage

if TYPE_CHECKING:  # MLflow is imported by the caller that builds the tracker
    from bench.tracking import Tracker

Log = Callable[[str], None]
_UNFINGERPRINTED = ("train.seed", "train.checkpoint_dir", "tracking.", "tune.")


def normalize_param(key: str) -> str:
    """`loss.temperature` (the paper's way of naming it) -> `loss.params.temperature`; other keys
    unchanged."""
    parts = key.split(".")
    if len(parts) == 2 and parts[0] == "loss" and parts[1] not in LossConfig.__dataclass_fields__:
        return f"loss.params.{parts[1]}"
    return key


def parse_values(text: str) -> list[Any]:
    """`0.001,0.01,1e-1` -> [0.001, 0.01, 0.1]; each item parsed as YAML (numbers, true/false, null)."""
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise ConfigError(f"--values {text!r}: empty item")
    try:
        return [_number_or_value(yaml.safe_load(item)) for item in items]
    except yaml.YAMLError as error:
        raise ConfigError(f"--values {text!r}: {error}") from error


def _number_or_value(value: Any) -> Any:
    """YAML 1.1 reads `1e-3` as a string; loss parameters are untyped in the config, so convert it here."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


@dataclass
class Cell:
    values: dict[str, Any]  # swept key -> value
    seed: int
    run_id: str | None
    metrics: dict[str, float]
    skipped: bool  # already FINISHED in MLflow


def _value_text(exp: Experiment, key: str) -> str:
    """The swept value as the config holds it after type coercion, so `1e-1` and `0.1` are the same cell."""
    return str(exp.flat()[key])


def fingerprint(exp: Experiment, swept: Sequence[str]) -> str:
    """Hash of every setting that is neither swept nor per-seed: a cell run under other fixed settings is not
    reused."""
    fixed = {
        k: v
        for k, v in exp.flat().items()
        if k not in swept and not any(k == p or k.startswith(p) for p in _UNFINGERPRINTED)
    }
    return hashlib.sha256(json.dumps(fixed, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=,-]+", "_", text)


def plan(
    exp: Experiment, grid: dict[str, Sequence[Any]], seeds: Sequence[int]
) -> list[tuple[Experiment, dict]]:
    """Every (cell, seed) as its experiment and its tags; bad keys or values fail here, before any
    training."""
    if not 1 <= len(grid) <= 2:
        raise ConfigError(f"an ablation sweeps one or two parameters, got {len(grid)}")
    if not seeds:
        raise ConfigError("an ablation needs at least one seed")
    keys = [normalize_param(k) for k in grid]
    cells = []
    for combo in itertools.product(*grid.values()):
        swept = dict(zip(keys, combo, strict=True))
        base = with_overrides(exp, swept)
        texts = {key: _value_text(base, key) for key in keys}
        tags = {STAGE: Stage.ABLATION, "ablation.config": fingerprint(base, keys)}
        for i, key in enumerate(keys):
            suffix = "" if i == 0 else str(i + 1)
            tags[f"ablation.param{suffix}"], tags[f"ablation.value{suffix}"] = key, texts[key]
        folder = layout.ablation_dir(
            exp.train.checkpoint_dir, _slug(",".join(f"{k}={v}" for k, v in texts.items()))
        )
        for seed in seeds:
            cells.append(
                (with_overrides(base, {"train.seed": seed, "train.checkpoint_dir": str(folder)}), tags)
            )
    return cells


def ablate(
    exp: Experiment,
    grid: dict[str, Sequence[Any]],
    *,
    tracker: Tracker,
    seeds: int | Sequence[int] = 3,
    device: str = "auto",
    bundle: DatasetBundle | None = None,
    log: Log | None = print,
) -> list[Cell]:
    """Train every grid cell with every seed (int: train.seed, +1, ...), skipping cells finished earlier."""
    seed_list = list(range(exp.train.seed, exp.train.seed + seeds)) if isinstance(seeds, int) else list(seeds)
    cells = plan(exp, grid, seed_list)
    bundle = bundle or load_dataset(exp.data)
    results: list[Cell] = []
    durations: list[float] = []
    for index, (cexp, tags) in enumerate(cells):
        keys = [v for k, v in tags.items() if k.startswith("ablation.param")]
        values = {key: cexp.flat()[key] for key in keys}
        params = {"loss": cexp.loss.name, "seed": cexp.train.seed}
        done = tracker.find_run(tags=tags, params=params, status="FINISHED")
        if done is not None:
            results.append(Cell(values, cexp.train.seed, done.info.run_id, dict(done.data.metrics), True))
            continue
        resume = holds_unfinished_run(default_checkpoint_path(cexp))
        started = time.perf_counter()
        label = ", ".join(f"{k}={v}" for k, v in values.items())
        result = train_and_evaluate(
            cexp,
            tracker,
            device=device,
            resume=resume,
            run_name=f"ablation {label} seed{cexp.train.seed}",
            tags=tags,
            bundle=bundle,
            progress=False,
        )
        tracker.log_params(result.run_id, {k: v for k, v in tags.items() if k.startswith("ablation.")})
        results.append(Cell(values, cexp.train.seed, result.run_id, result.test_metrics, False))
        durations.append(time.perf_counter() - started)
        if log:
            left = sum(durations) / len(durations) * (len(cells) - index - 1)
            val = (
                result.val_history[-1].get(VAL_MAP_AT_R, float("nan")) if result.val_history else float("nan")
            )
            log(
                f"[ablate] {label} seed {cexp.train.seed} ({index + 1}/{len(cells)}): val MAP@R {val:.4f} | "
                f"test MAP@R {result.test_metrics.get(TEST_MAP_AT_R, float('nan')):.4f} | "
                f"{format_seconds(durations[-1])} | ~{format_seconds(left)} left"
            )
    return results
