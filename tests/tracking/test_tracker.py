"""The tracker is the one place that talks to MLflow: run statuses follow how a block ends, and searches
find exactly the runs whose tags, params and status match (read back with a plain MlflowClient)."""

from __future__ import annotations

from contextlib import nullcontext

import optuna
import pytest
from mlflow.tracking import MlflowClient

from bench.tracking import MissingExperiment, Tracker


@pytest.fixture
def tracker(tracking_uri, tmp_path) -> Tracker:
    return Tracker(tracking_uri, "t", str(tmp_path / "artifacts"))


def status(tracking_uri: str, run_id: str) -> str:
    return MlflowClient(tracking_uri).get_run(run_id).info.status


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (None, "FINISHED"),
        (optuna.TrialPruned("pruned at step 1"), "KILLED"),
        (KeyboardInterrupt(), "KILLED"),
        (RuntimeError("disk full"), "FAILED"),
    ],
)
def test_a_run_ends_with_the_status_of_its_block(tracker, tracking_uri, error, expected):
    seen = []
    with pytest.raises(type(error)) if error is not None else nullcontext():
        with tracker.run("r", {"stage": "x"}) as run_id:
            seen.append(run_id)
            assert status(tracking_uri, run_id) == "RUNNING"
            if error is not None:
                raise error
    assert status(tracking_uri, seen[0]) == expected
    failure = MlflowClient(tracking_uri).get_run(seen[0]).data.tags.get("failure")
    assert (failure == "RuntimeError: disk full") if expected == "FAILED" else failure is None


def test_a_reopened_run_keeps_its_id_and_finishes_again(tracker, tracking_uri):
    with tracker.run("r") as first:
        pass
    with tracker.run(run_id=first) as again:
        assert again == first and status(tracking_uri, first) == "RUNNING"
    assert status(tracking_uri, first) == "FINISHED"


def test_find_runs_matches_tags_params_and_status_exactly(tracker):
    made = {}
    for trial, seed, fail in ((1, 1, False), (1, 2, False), (2, 1, False), (1, 1, True)):
        try:
            with tracker.run(f"{trial}-{seed}", {"study": "o'brien-study", "trial": str(trial)}) as run_id:
                tracker.log_params(run_id, {"seed": seed})
                made[(trial, seed, fail)] = run_id
                if fail:
                    raise ValueError("boom")
        except ValueError:
            pass
    found = tracker.find_runs(tags={"study": "o'brien-study", "trial": 1}, params={"seed": 1})
    assert {r.info.run_id for r in found} == {made[(1, 1, False)], made[(1, 1, True)]}
    finished = tracker.find_run(tags={"trial": "1"}, params={"seed": "1"}, status="FINISHED")
    assert finished.info.run_id == made[(1, 1, False)]
    assert tracker.find_run(tags={"trial": "3"}) is None
    assert len(tracker.find_runs(tags={"study": "o'brien-study"})) == 4


def test_a_read_only_tracker_names_the_experiments_it_has(tracker, tracking_uri):
    with pytest.raises(MissingExperiment, match=r"experiment 'nope' not found .* it has: .*\bt\b"):
        Tracker(tracking_uri, "nope", create=False)
    assert Tracker(tracking_uri, "t", create=False).experiment_id == tracker.experiment_id


def test_passwords_in_urls_never_reach_params_or_tags(tracker, tracking_uri):
    with tracker.run("r") as run_id:
        tracker.log_params(run_id, {"storage": "postgresql://u:s3cret@db/optuna"})
        tracker.set_tags(run_id, {"server": "http://me:s3cret@mlflow:5000"})
    data = MlflowClient(tracking_uri).get_run(run_id).data
    assert "s3cret" not in str(data.params) + str(data.tags)
    assert data.params["storage"] == "postgresql://u:***@db/optuna"
