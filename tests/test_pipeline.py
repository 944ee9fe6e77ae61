"""The main job as a library call: every loss tuned, final seeds, then the report step."""

from __future__ import annotations

import pytest

from bench.config import ConfigError
from bench.pipeline import run_main_job, tune
from bench.tracking import Tracker
from bench.tune import TuneJob
from tests.helpers import tiny_bundle, tiny_experiment


def runs(tracker: Tracker, where: str):
    return tracker.client.search_runs([tracker.experiment_id], where, max_results=1000)


def test_the_main_job_tunes_every_loss_runs_final_seeds_and_then_reports(tmp_path, tracker):
    exp = tiny_experiment(tmp_path, trials=1, epochs=1, extra=["tune.final_seeds=1"])
    seen = []

    def report(result):
        seen.append(result)
        return [tmp_path / "report.md"]

    result = run_main_job(
        TuneJob(exp, ["smooth_ap", "fastap"], device="cpu"),
        tracker=tracker,
        bundle=tiny_bundle(),
        log=None,
        after=report,
    )
    assert result.complete and seen == [result] and result.report_files == [tmp_path / "report.md"]
    assert list(result.budgets["finished"]) == [1, 1]
    assert {loss: [f.seed for f in finals] for loss, finals in result.finals.items()} == {
        "smooth_ap": [1],
        "fastap": [1],
    }
    assert sorted(r.data.params["loss"] for r in runs(tracker, "tags.stage = 'final'")) == [
        "fastap",
        "smooth_ap",
    ]


def test_tune_is_the_job_without_the_report_and_finals_come_once_asked(tmp_path, tracker):
    exp = tiny_experiment(tmp_path, trials=1, epochs=1, extra=["tune.final_seeds=1"])
    bundle = tiny_bundle()
    tuned = tune(
        TuneJob(exp, ["smooth_ap"], device="cpu", finals=False), tracker=tracker, bundle=bundle, log=None
    )
    assert tuned.complete and tuned.finals == {} and tuned.report_files == []
    assert runs(tracker, "tags.stage = 'final'") == []

    lines: list[str] = []
    again = tune(TuneJob(exp, ["smooth_ap"], device="cpu"), tracker=tracker, bundle=bundle, log=lines.append)
    assert not any(line.startswith("[tune] smooth_ap") for line in lines)  # the finished study adds no trial
    assert [f.seed for f in again.finals["smooth_ap"]] == [1] and again.complete
    (final,) = runs(tracker, "tags.stage = 'final'")
    assert final.data.tags["study"] == "omniglot-smooth_ap"


def test_a_named_study_takes_exactly_one_loss_before_any_data_is_read(tmp_path):
    with pytest.raises(ConfigError, match="exactly one loss"):
        TuneJob(tiny_experiment(tmp_path), ["smooth_ap", "triplet"], study_name="mine")
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        TuneJob(tiny_experiment(tmp_path), ["nope"])
