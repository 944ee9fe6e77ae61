"""Search ranges that cap a loss: a best value at the edge of its range is flagged, an interior one is not,
and widening extends exactly the side that was hit."""

from __future__ import annotations

import math

import optuna
import pytest

from bench.tune.edges import EdgeHit, WidenedTrial, edge_hits, study_edge_hits, widened_range


def tuned(objective, trials: int = 40) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=3))
    study.optimize(objective, n_trials=trials)
    return study


def test_an_optimum_beyond_the_range_is_flagged_and_an_interior_one_is_not():
    # validation score rising with the temperature past the top of its range, as Smooth-AP's did on Omniglot
    beyond = tuned(
        lambda t: -((math.log(t.suggest_float("temperature", 1e-3, 0.1, log=True)) - math.log(0.5)) ** 2)
    )
    (hit,) = study_edge_hits(beyond)
    assert (hit.param, hit.side, hit.log, hit.high) == ("temperature", "high", True, 0.1)
    inside = tuned(
        lambda t: -((math.log(t.suggest_float("temperature", 1e-3, 0.1, log=True)) - math.log(0.01)) ** 2)
    )
    assert study_edge_hits(inside) == []
    below = tuned(
        lambda t: -abs(t.suggest_float("margin", 0.2, 1.0) - 0.05)
    )  # linear range, optimum below it
    assert [(h.param, h.side) for h in study_edge_hits(below)] == [("margin", "low")]


def test_edges_are_measured_on_the_log_scale_for_log_ranges():
    def best(value: float, log: bool) -> list[EdgeHit]:
        dist = optuna.distributions.FloatDistribution(1e-3, 1e-1, log=log)
        trial = optuna.trial.create_trial(params={"x": value}, distributions={"x": dist}, value=1.0)
        return edge_hits(trial)

    # 0.0013 is 5.7% of the log width above 1e-3 (not an edge) but 0.3% of the linear width (an edge)
    assert best(0.0013, log=True) == [] and [h.side for h in best(0.0013, log=False)] == ["low"]
    assert [h.side for h in best(0.0012, log=True)] == ["low"]  # 4.0% of the log width
    assert [h.side for h in best(0.0795, log=True)] == ["high"]  # log10: 95.0% of the width
    choice = optuna.distributions.CategoricalDistribution(["a", "b"])
    assert (
        edge_hits(optuna.trial.create_trial(params={"c": "a"}, distributions={"c": choice}, value=1.0)) == []
    )


@pytest.mark.parametrize(
    ("hit", "factor", "expected"),
    [
        (EdgeHit("t", 0.1, 1e-3, 0.1, True, "high"), 10, (1e-3, 1.0)),
        (EdgeHit("t", 1e-3, 1e-3, 0.1, True, "low"), 10, (1e-4, 0.1)),
        (EdgeHit("m", 0.5, 0.0, 0.5, False, "high"), 3, (0.0, 1.5)),
        (
            EdgeHit("m", 0.1, 0.1, 0.5, False, "low"),
            2,
            (0.0, 0.5),
        ),  # never below zero from a range at or above it
        (EdgeHit("b", -1.0, -1.0, 1.0, False, "low"), 2, (-3.0, 1.0)),
    ],
)
def test_widening_extends_the_side_that_was_hit(hit, factor, expected):
    assert widened_range(hit, factor) == pytest.approx(expected)


def test_a_widened_trial_replaces_only_the_named_ranges():
    study = optuna.create_study()
    trial = WidenedTrial(study.ask(), {"temperature": [1e-3, 1.0], "bins": [2, 40]})
    trial.suggest_float("temperature", 1e-3, 0.1, log=True)
    trial.suggest_float("margin", 0.1, 0.5)
    trial.suggest_int("bins", 4, 20)
    dists = trial.distributions
    assert (dists["temperature"].low, dists["temperature"].high, dists["temperature"].log) == (
        1e-3,
        1.0,
        True,
    )
    assert (dists["margin"].low, dists["margin"].high) == (0.1, 0.5)
    assert (dists["bins"].low, dists["bins"].high) == (2, 40)


def test_an_edge_is_tagged_reported_and_widened_on_an_equal_budget(tmp_path, tracker, synthetic_bundle):
    from bench.pipeline import run_main_job
    from bench.report.edges import edge_frame, edge_notes
    from bench.tune import LossTuner, TuneJob, open_storage
    from tests.helpers import tiny_experiment

    exp = tiny_experiment(tmp_path, trials=1, epochs=1, extra=["tune.final_seeds=1", "tune.pruner=none"])
    storage = open_storage(exp.tune.storage)
    tuner = LossTuner(exp, storage, tracker, synthetic_bundle, device="cpu")
    tuner.study.study.enqueue_trial({"temperature": 1.0})  # the study's first trial: the top of the range
    lines: list[str] = []
    result = run_main_job(
        TuneJob(exp, ["smooth_ap"], device="cpu", widen=10),
        tracker=tracker,
        bundle=synthetic_bundle,
        log=lines.append,
        after=lambda _: [],
    )
    assert any(line.startswith("[tune] edge: smooth_ap temperature=1 at the high edge") for line in lines)
    (parent,) = tracker.find_runs(tags={"stage": "study", "study": "omniglot-smooth_ap"})
    assert parent.data.tags["edge.temperature"] == "high" and parent.data.tags["edges"] == "1"

    widened = optuna.load_study(study_name="omniglot-smooth_ap-widened", storage=exp.tune.storage)
    space = widened.trials[0].distributions["temperature"]
    assert (space.low, space.high, space.log) == pytest.approx((1e-3, 10.0, True))
    assert list(result.budgets["study"]) == ["omniglot-smooth_ap-widened"]
    assert list(result.budgets["finished"]) == [1] == [exp.tune.trials]  # the same budget as every loss
    (final,) = tracker.find_runs(tags={"stage": "final"})
    assert final.data.tags["study"] == "omniglot-smooth_ap-widened"

    studies = {"smooth_ap": optuna.load_study(study_name="omniglot-smooth_ap", storage=exp.tune.storage)}
    notes = edge_notes(edge_frame(studies), studies)
    assert "smooth_ap: temperature = 1 at the high edge of its log range [0.001, 1]" in notes
