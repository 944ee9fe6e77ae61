"""The main job: tune every loss on an equal budget, run each loss's final seeds, write the report and the
gradient analysis. Re-running the same call continues where the previous one stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import layout

if TYPE_CHECKING:  # imported where used, so that the CLI's parser can read the --quick settings at once
    from bench.config import Experiment
    from bench.data import DatasetBundle
    from bench.tracking import Tracker
    from bench.tune import FinalRun, StudySummary

Log = Callable[[str], None]

# --quick: a smoke-sized comparison in a few minutes, under its own experiment name
QUICK_OVERRIDES = ("tune.trials=2", "tune.epochs=1", "tune.final_epochs=1", "tune.final_seeds=1")
QUICK_EXPERIMENT = "omniglot-quick"


def main_job_overrides(quick: bool, experiment_name: str | None, user_overrides: Sequence[str]) -> list[str]:
    """--quick's budget and the experiment's name (its MLflow experiment and study prefix) as config
    overrides, before the user's own --set ones so that those still win."""
    name = experiment_name or (QUICK_EXPERIMENT if quick else None)
    renamed = [f"name={name}", f"tracking.experiment={name}"] if name else []
    return [*(QUICK_OVERRIDES if quick else ()), *renamed, *user_overrides]


@dataclass
class MainJobResult:
    studies: dict[str, StudySummary]
    finals: dict[str, list[FinalRun]]
    budgets: Any  # pandas DataFrame from budget_report
    complete: bool  # every study reached its budget and every loss has its final runs
    report_files: list[Path] = field(default_factory=list)


def run_main_job(
    exp: Experiment,
    loss_names: Sequence[str],
    *,
    tracker: Tracker,
    storage: str | None = None,
    device: str = "auto",
    timeout: float | None = None,
    bundle: DatasetBundle | None = None,
    log: Log | None = print,
    report_dir: str | Path | None = None,
    after: Callable[[MainJobResult], list[Path]] | None = None,
    widen: float | None = None,
) -> MainJobResult:
    """Tune, final seeds, then `make_report` and `make_grad_report` into `report_dir` (default
    results/<tracking experiment>/ and its grad/), unless `after(result) -> files` replaces both.

    `widen`: after tuning, a loss whose best value hit an edge of its range is tuned again, on the same
    budget, over that range widened by this factor (bench.tune.edges), and its final runs come from that
    study.
    """
    from bench.data import load_dataset
    from bench.tune import budget_report, format_seconds, run_finals, tune_losses
    from bench.tune.runner import ranges_to_widen
    from bench.tune.space import with_overrides

    storage = storage or exp.tune.storage
    bundle = bundle or load_dataset(exp.data)
    started = time.perf_counter()
    studies = tune_losses(
        exp,
        loss_names,
        tracker=tracker,
        storage=storage,
        timeout=timeout,
        device=device,
        bundle=bundle,
        log=log,
    )
    if widen is not None and all(s.done for s in studies.values()):
        ranges = ranges_to_widen(exp, loss_names, storage, widen)
        if log:
            log(
                f"[run] widening x{widen}: "
                + (", ".join(f"{k} {v}" for k, v in ranges.items()) or "no edge hit")
            )
        if ranges:
            exp = with_overrides(exp, {"tune.widen": {**exp.tune.widen, **ranges}})
            kw = {"tracker": tracker, "storage": storage, "timeout": timeout, "device": device, "log": log}
            studies.update(tune_losses(exp, list(ranges), bundle=bundle, **kw))
    finals: dict[str, list[FinalRun]] = {}
    if all(s.done for s in studies.values()):
        for loss in loss_names:
            finals[loss] = run_finals(
                exp, loss, tracker=tracker, storage=storage, device=device, bundle=bundle, log=log
            )
    budgets = budget_report(storage, exp.name, loss_names, widened=list(exp.tune.widen))
    result = MainJobResult(studies, finals, budgets, complete=len(finals) == len(loss_names))
    if log:
        log(f"[run] tuning and final seeds took {format_seconds(time.perf_counter() - started)}")
    if not result.complete:
        if log:
            log("[run] not every study reached its budget: re-run the same command to continue")
        return result
    if after is not None:
        result.report_files = list(after(result))
        return result
    out = Path(report_dir or layout.report_dir(exp.tracking.experiment))
    result.report_files = write_reports(tracker, exp.tracking.experiment, out, storage, device, log)
    return result


def write_reports(
    tracker: Tracker, experiment: str, out: Path, storage: str, device: str, log: Log | None
) -> list[Path]:
    """The comparison report into `out` and the gradient analysis into `out/grad`."""
    from bench.device import resolve_device
    from bench.report import make_grad_report, make_report

    files = make_report(
        tracker.uri, experiment, out, optuna_storage=storage, device=resolve_device(device).type
    )
    if log:
        log(f"[run] report: {len(files)} files in {out}/")
    grad_files = make_grad_report(tracker.uri, experiment, out / "grad")
    if log:
        log(f"[run] gradient analysis: {len(grad_files)} files in {out / 'grad'}/")
    return files + grad_files


def mean_test_metrics(finals: Sequence[FinalRun]) -> dict[str, float]:
    """Each test metric's mean over a loss's final-seed runs (the metrics every run has)."""
    keys = set.intersection(*(set(f.test_metrics) for f in finals))
    return {k: sum(f.test_metrics[k] for f in finals) / len(finals) for k in keys}
