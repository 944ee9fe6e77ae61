"""The run vocabulary: the names the MLflow and Optuna stores hold, written by training and tuning and read
back by the report, the notebooks and users' own queries (`tags.stage = 'final'`).

Kept in one module so that a writer and its reader cannot drift apart: a renamed tag here is renamed
everywhere. The values are part of the stores' format: changing one orphans every run logged before.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Stage(str, Enum):
    """What a run is, tagged `stage=<value>` on every MLflow run. A str, so tags and filters hold the plain
    value (`final`, not `Stage.FINAL`) on every Python version."""

    TRAIN = "train"  # a single `train` run
    STUDY = "study"  # a study's parent run: its budget, search space and best trial
    TRIAL = "trial"  # one tuning trial (validation only)
    CV_FOLD = "cv_fold"  # one fold of a cross-validated trial
    FINAL = "final"  # a final seed run of a loss's best trial: what the report compares
    ABLATION = "ablation"  # one cell of an ablation grid

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


# MLflow tag keys
STAGE = "stage"
STUDY = "study"  # the Optuna study a trial or final run belongs to
TRIAL = "trial"  # the trial's number in its study
FOLD = "fold"
BEST_TRIAL = "best_trial"  # on final runs: the trial whose parameters they retrain
OPTUNA_STATE = "optuna.state"  # on trial runs: COMPLETE or PRUNED, as Optuna ended the trial
SUPERSEDED_BY = "superseded_by"  # on final runs replaced by a retuning over widened ranges

# MLflow metric keys (`<split>/<metric>`, as bench.evaluate names them)
TRAIN_LOSS = "train/loss"
VAL_MAP_AT_R = "val/map_at_r"
VAL_RECALL_AT_1 = "val/recall_at_1"
TEST_MAP_AT_R = "test/map_at_r"
TEST_RECALL_AT_1 = "test/recall_at_1"
OBJECTIVE = VAL_MAP_AT_R  # what every study maximises

# Optuna study user attribute: the study's MLflow parent run, linking the two stores
PARENT_RUN_ATTR = "mlflow_parent_run_id"

WIDENED_SUFFIX = "-widened"


def study_name(experiment: str, loss: str, widened: bool = False) -> str:
    """`<experiment>-<loss>`, or `<experiment>-<loss>-widened` for a loss retuned over widened ranges."""
    return f"{experiment}-{loss}{WIDENED_SUFFIX if widened else ''}"


@dataclass(frozen=True)
class StudyName:
    """What a study's name says: its loss and whether it is a widened retuning."""

    loss: str
    widened: bool


def parse_study_name(name: str, experiment: str) -> StudyName | None:
    """The inverse of `study_name`; None when `name` does not start with `<experiment>-`."""
    prefix = f"{experiment}-"
    if not name.startswith(prefix):
        return None
    rest = name[len(prefix) :]
    widened = rest.endswith(WIDENED_SUFFIX)
    return StudyName(rest.removesuffix(WIDENED_SUFFIX), widened)
