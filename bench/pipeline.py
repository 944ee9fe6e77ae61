"""The only orchestrator: a `TuneJob` tuned on an equal budget per loss, widened where a range capped a loss,
each loss's final seeds run, then (the main job, `run`) the report and the gradient analysis. The `tune`
command is the same job without the report. Re-running the same call continues where the previous one
stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import layout

if TYPE_CHECKING:  # imported where used, so that the CLI's parser can read the --quick settings at once
    from bench.data import DatasetBundle
    from bench.tracking import Tracker
    from bench.tune import FinalRun, StudySummary, TuneJob

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
class JobResult:
    """What a job left: its studies, final runs and budgets, and the report's files (none for `tune`).

    `job` is the job as it ended: after widening, its experiment's `tune.widen` names the retuned losses."""

    job: TuneJob
    studies: dict[str, StudySummary]
    finals: dict[str, list[FinalRun]]
    budgets: Any  # pandas DataFrame from budget_report
    report_files: list[Path] = field(default_factory=list)

    @property
    def tuned(self) -> bool:
        """Every study reached its budget."""
        return all(s.done for s in self.studies.values())

    @property
    def complete(self) -> bool:
        """Every study reached its budget, and every loss has its final runs when the job asked for them."""
        return self.tuned and (not self.job.finals or set(self.finals) == set(self.job.losses))


def tune(
    job: TuneJob, *, tracker: Tracker | None, bundle: DatasetBundle | None = None, log: Log | None = print
) -> JobResult:
    """The `tune` command: the job's studies (first in `job.workers` processes, then in this one, which
    closes them), widening, then the final seeds."""
    from bench.data import load_dataset
    from bench.tune import budget_report, open_storage, run_finals, tune_losses
    from bench.tune.workers import time_left, tune_in_workers

    open_storage(job.storage)  # an unreachable database fails in seconds, before any data is read
    bundle = bundle if bundle is not None else load_dataset(job.exp.data)
    started = time.monotonic()
    if job.workers > 1:
        tune_in_workers(job, tracker=tracker, bundle=bundle, log=log)
    # what the workers left of the timeout: this finds the budgets done, or finishes what dead workers left
    job = replace(job, timeout=time_left(job.timeout, started))
    studies = tune_losses(job, tracker=tracker, bundle=bundle, log=log)
    job, widened = widen_edges(job, studies, tracker=tracker, bundle=bundle, log=log)
    studies.update(widened)
    finals: dict[str, list[FinalRun]] = {}
    if job.finals and all(s.done for s in studies.values()):
        for loss in job.losses:
            finals[loss] = run_finals(job, loss, tracker=tracker, bundle=bundle, log=log)
    budgets = budget_report(job.storage, job.exp.name, job.losses, widened=list(job.exp.tune.widen))
    return JobResult(job, studies, finals, budgets)


def widen_edges(
    job: TuneJob,
    studies: dict[str, StudySummary],
    *,
    tracker: Tracker | None,
    bundle: DatasetBundle,
    log: Log | None,
) -> tuple[TuneJob, dict[str, StudySummary]]:
    """`job.widen`: once every study is done, each loss whose best value hit an edge of a range is tuned
    again over that range widened, on the same budget (bench.tune.edges). Returns the job with `tune.widen`
    set for those losses (their final runs then come from the widened studies) and the widened studies. A
    job on a named study (`study_name`) is not widened."""
    from bench.tune import tune_losses, with_overrides
    from bench.tune.runner import ranges_to_widen

    if job.widen is None or job.study_name or not all(s.done for s in studies.values()):
        return job, {}
    ranges = ranges_to_widen(job, job.widen)
    if log:
        hits = ", ".join(f"{k} {v}" for k, v in ranges.items()) or "no edge hit"
        log(f"[tune] widening x{job.widen}: {hits}")
    if not ranges:
        return job, {}
    job = replace(job, exp=with_overrides(job.exp, {"tune.widen": {**job.exp.tune.widen, **ranges}}))
    return job, tune_losses(replace(job, losses=tuple(ranges)), tracker=tracker, bundle=bundle, log=log)


def run_main_job(
    job: TuneJob,
    *,
    tracker: Tracker,
    bundle: DatasetBundle | None = None,
    log: Log | None = print,
    report_dir: str | Path | None = None,
    after: Callable[[JobResult], list[Path]] | None = None,
) -> JobResult:
    """The `run` command: `tune`, then `make_report` and `make_grad_report` into `report_dir` (default
    results/<tracking experiment>/ and its grad/), unless `after(result) -> files` replaces both."""
    from bench.tune import format_seconds

    started = time.perf_counter()
    result = tune(job, tracker=tracker, bundle=bundle, log=log)
    if log:
        log(f"[run] tuning and final seeds took {format_seconds(time.perf_counter() - started)}")
    if not result.complete:
        if log:
            log("[run] not every study reached its budget: re-run the same command to continue")
        return result
    if after is not None:
        result.report_files = list(after(result))
        return result
    experiment = job.exp.tracking.experiment
    out = Path(report_dir or layout.report_dir(experiment))
    result.report_files = write_reports(tracker, experiment, out, job.storage, job.device, log)
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
