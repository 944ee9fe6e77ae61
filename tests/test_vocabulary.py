"""The run vocabulary as the stores hold it: stage tags are the plain strings users query, study names parse
back into what built them, and the report finds an experiment's studies by those names."""

from __future__ import annotations

import optuna
import pytest
from mlflow.tracking import MlflowClient

from bench.tune.stored import experiment_studies
from bench.vocabulary import STAGE, Stage, StudyName, parse_study_name, study_name


@pytest.mark.parametrize(
    ("name", "experiment", "parsed"),
    [
        ("omniglot-smooth_ap", "omniglot", StudyName("smooth_ap", False)),
        ("omniglot-smooth_ap-widened", "omniglot", StudyName("smooth_ap", True)),
        ("omniglot-quick-multi_similarity", "omniglot-quick", StudyName("multi_similarity", False)),
        ("sop-triplet", "omniglot", None),  # another experiment's study
        ("omniglotx-triplet", "omniglot", None),  # a name that merely starts with the experiment's
    ],
)
def test_a_study_name_parses_back_into_its_loss_and_widening(name, experiment, parsed):
    assert parse_study_name(name, experiment) == parsed
    if parsed is not None:
        assert study_name(experiment, parsed.loss, parsed.widened) == name


def test_stage_tags_are_stored_and_found_as_their_plain_strings(tracker, tracking_uri):
    run_id = tracker.start_run("final-run", {STAGE: Stage.FINAL})
    tracker.set_tags(run_id, {"next": Stage.ABLATION})
    tags = MlflowClient(tracking_uri).get_run(run_id).data.tags  # read back without the tracker
    assert (tags["stage"], tags["next"]) == ("final", "ablation")
    assert [run.info.run_id for run in tracker.find_runs(tags={STAGE: Stage.FINAL})] == [run_id]
    assert f"stage={Stage.CV_FOLD}" == "stage=cv_fold" and str(Stage.TRIAL) == "trial"


def test_the_report_reads_an_experiments_studies_by_their_names(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    for name in ("exp-a", "exp-a-widened", "exp-b", "other-c", "exp-d-widened"):
        optuna.create_study(study_name=name, storage=storage, direction="maximize")

    def names(studies: dict) -> dict[str, str]:
        return {loss: study.study_name for loss, study in studies.items()}

    assert names(experiment_studies(storage, "exp")) == {"a": "exp-a", "b": "exp-b"}
    tagged = {"a": "exp-a-widened", "b": "exp-b-gone"}  # a final run's study tag wins when the study exists
    assert names(experiment_studies(storage, "exp", tagged)) == {"a": "exp-a-widened", "b": "exp-b"}
    missing = tmp_path / "none.db"
    assert experiment_studies(f"sqlite:///{missing}", "exp") == {} and not missing.exists()
