"""Ablation grids: tagged runs per (value, seed), finished cells skipped on re-run, other fixed settings not
reused."""

from __future__ import annotations

import pytest

from bench.ablate import ablate, normalize_param, parse_values, plan
from bench.config import ConfigError
from bench.tracking import Tracker
from tests.helpers import tiny_bundle, tiny_experiment


def ablation_runs(tracker: Tracker):
    return tracker.client.search_runs([tracker.experiment_id], "tags.stage = 'ablation'", max_results=100)


def test_grid_runs_are_tagged_and_a_rerun_only_trains_unfinished_cells(tmp_path, tracker):
    exp = tiny_experiment(tmp_path, epochs=1)
    bundle = tiny_bundle()
    grid = {"loss.temperature": parse_values("0.01,1e-1")}
    cells = ablate(exp, grid, tracker=tracker, seeds=2, device="cpu", bundle=bundle, log=None)
    assert [(c.values["loss.params.temperature"], c.seed) for c in cells] == [
        (0.01, 0),
        (0.01, 1),
        (0.1, 0),
        (0.1, 1),
    ]

    runs = ablation_runs(tracker)
    assert len(runs) == 4
    seen = set()
    for run in runs:
        params = run.data.params
        assert params["ablation.param"] == "loss.params.temperature" and params["loss"] == "smooth_ap"
        assert (
            params["ablation.value"] == params["loss.params.temperature"]
        )  # the value the model trained with
        assert "test/map_at_r" in run.data.metrics and run.info.status == "FINISHED"
        seen.add((float(params["ablation.value"]), int(params["seed"])))
    assert seen == {(0.01, 0), (0.01, 1), (0.1, 0), (0.1, 1)}

    again = ablate(exp, grid, tracker=tracker, seeds=2, device="cpu", bundle=bundle, log=None)
    assert all(c.skipped for c in again) and len(ablation_runs(tracker)) == 4

    broken = next(
        r for r in runs if r.data.params["ablation.value"] == "0.1" and r.data.params["seed"] == "1"
    )
    tracker.client.set_terminated(broken.info.run_id, "FAILED")
    third = ablate(exp, grid, tracker=tracker, seeds=2, device="cpu", bundle=bundle, log=None)
    assert [(c.values["loss.params.temperature"], c.seed) for c in third if not c.skipped] == [(0.1, 1)]
    assert len(ablation_runs(tracker)) == 5


def test_a_cell_finished_under_other_fixed_settings_is_not_reused(tmp_path):
    short, longer = tiny_experiment(tmp_path, epochs=1), tiny_experiment(tmp_path, epochs=2)
    grid = {"loss.params.temperature": [0.01]}
    (_, tags_short), (_, tags_longer) = plan(short, grid, [0])[0], plan(longer, grid, [0])[0]
    assert tags_short["ablation.config"] != tags_longer["ablation.config"]
    other_seed = plan(short, grid, [5])[0][1]
    assert other_seed == tags_short  # the seed is matched separately, not part of the fingerprint


def test_two_parameter_grids_cover_the_product_and_bad_keys_fail_early(tmp_path):
    exp = tiny_experiment(tmp_path)
    cells = plan(exp, {"data.samples_per_class": [2, 4], "model.embedding_dim": [8, 16, 32]}, [0, 1])
    assert len(cells) == 12
    pairs = {(c.data.samples_per_class, c.model.embedding_dim, c.train.seed) for c, _ in cells}
    assert len(pairs) == 12
    first_tags = cells[0][1]
    assert first_tags["ablation.param2"] == "model.embedding_dim" and first_tags["ablation.value2"] == "8"
    assert len({c.train.checkpoint_dir for c, _ in cells}) == 6  # one folder per cell, seeds inside it
    with pytest.raises(ConfigError, match="learnrate"):
        plan(exp, {"optim.learnrate": [0.1]}, [0])
    with pytest.raises(ConfigError, match="one or two"):
        plan(exp, {"a.b": [1], "c.d": [1], "e.f": [1]}, [0])


def test_paper_style_names_and_values_are_parsed():
    assert normalize_param("loss.temperature") == "loss.params.temperature"
    assert normalize_param("loss.name") == "loss.name" and normalize_param("optim.lr") == "optim.lr"
    assert parse_values("0.001, 1e-2,4,true") == [0.001, 0.01, 4, True]
    with pytest.raises(ConfigError, match="empty item"):
        parse_values("1,,2")
