"""Fair head-to-head tuning: one Optuna study per loss on an equal trial budget, then S final seeds per loss.

Fairness rules built in here (Musgrave et al., "A Metric Learning Reality Check", ECCV 2020):
- every loss gets the same budget of finished (COMPLETE + PRUNED) trials, the same recipe and the same data;
- trials are scored on validation classes held out from training (or class-disjoint k-fold over the training
  classes), never on test classes; only the final seed runs touch the test set, once each.

The package is cut along its seams: `job` (one tuning job, described once), `space` (what a trial overrides),
`sampler` (TPE seeded per trial, pruners), `study` (Optuna only: create, audit, count), `objective` (one
trial's body), `runner` (many losses in turn, with their MLflow parent runs), `workers` (several processes),
`finals` (the final seeds) and `stored` (what a storage holds, read for reports). The order they run in, with
widening, lives in `bench.pipeline`; run names and keys in `bench.vocabulary`.
"""

from bench.tune.finals import FinalRun, final_seeds, run_finals
from bench.tune.job import TuneJob
from bench.tune.objective import Objective, SurplusTrial, fold_bundle
from bench.tune.runner import LossTuner, TrialLine, format_seconds, tune_losses
from bench.tune.sampler import TrialSeededTPE, make_pruner
from bench.tune.space import describe_space, for_loss, suggest_overrides, suggest_shared, with_overrides
from bench.tune.stored import budget_report, experiment_studies
from bench.tune.study import LossStudy, StudySummary, open_storage

__all__ = [
    "FinalRun",
    "LossStudy",
    "LossTuner",
    "Objective",
    "StudySummary",
    "SurplusTrial",
    "TrialLine",
    "TrialSeededTPE",
    "TuneJob",
    "budget_report",
    "describe_space",
    "experiment_studies",
    "final_seeds",
    "fold_bundle",
    "for_loss",
    "format_seconds",
    "make_pruner",
    "open_storage",
    "run_finals",
    "suggest_overrides",
    "suggest_shared",
    "tune_losses",
    "with_overrides",
]
