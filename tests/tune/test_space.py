"""What a trial tunes: the seeded sampler, shared search-space entries as config overrides, study naming."""

from __future__ import annotations

import optuna
import pytest

from bench.config import ConfigError
from bench.tune import TrialSeededTPE, TuneJob, suggest_shared, with_overrides
from tests.helpers import tiny_experiment


def test_trial_seeded_sampler_is_reproducible_and_differs_between_trials():
    def first_two(sampler_a, sampler_b):
        study = optuna.create_study(direction="maximize")
        values = []
        for sampler in (sampler_a, sampler_b):  # a second process has its own sampler object
            study.sampler = sampler
            values.append(study.ask().suggest_float("x", 0.0, 1.0))
        return values

    one = first_two(TrialSeededTPE(7, 2), TrialSeededTPE(7, 2))
    two = first_two(TrialSeededTPE(7, 2), TrialSeededTPE(7, 2))
    assert one == two and one[0] != one[1]


def test_shared_space_entries_become_config_overrides(tmp_path):
    exp = tiny_experiment(tmp_path)
    space = {
        "optim.lr": {"low": "1e-4", "high": 1e-2, "log": True},
        "model.embedding_dim": {"choices": [8, 32]},
        "data.samples_per_class": {"low": 2, "high": 4},
    }
    trial = optuna.create_study().ask()
    values = suggest_shared(trial, space)
    dists = trial.distributions
    assert dists["optim.lr"].log and dists["optim.lr"].low == 1e-4
    assert isinstance(dists["data.samples_per_class"], optuna.distributions.IntDistribution)
    assert dists["model.embedding_dim"].choices == (8, 32)
    tuned = with_overrides(exp, values)
    assert (tuned.optim.lr, tuned.model.embedding_dim, tuned.data.samples_per_class) == (
        values["optim.lr"],
        values["model.embedding_dim"],
        values["data.samples_per_class"],
    )
    with pytest.raises(ConfigError, match="tune.shared_space.optim.lr"):
        suggest_shared(optuna.create_study().ask(), {"optim.lr": {"low": 1e-4, "hgih": 1e-2}})
    with pytest.raises(ConfigError, match="optim"):
        with_overrides(exp, {"optim.learning_rate": 0.1})


def test_a_study_name_with_several_losses_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="exactly one loss"):
        TuneJob(tiny_experiment(tmp_path), ["smooth_ap", "triplet"], study_name="x")
