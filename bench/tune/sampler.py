"""The sampler and pruner every study uses."""

from __future__ import annotations

import warnings

import numpy as np
import optuna


class TrialSeededTPE(optuna.samplers.BaseSampler):
    """TPE whose random state for trial n is seeded from (seed, n).

    One seeded TPESampler per process would make two workers draw the same random startup points; seeding by
    trial number keeps a study reproducible after restarts and gives every parallel trial its own draw. TPE
    keeps no state besides its RNG (it reads the history from the storage), so a fresh sampler per trial loses
    nothing.
    """

    def __init__(self, seed: int, n_startup_trials: int) -> None:
        self.seed = seed
        self.n_startup_trials = n_startup_trials
        self._current: tuple[int, optuna.samplers.TPESampler] | None = None

    def _sampler(self, trial: optuna.trial.FrozenTrial) -> optuna.samplers.TPESampler:
        if self._current is None or self._current[0] != trial.number:
            seed = int(np.random.SeedSequence([self.seed, trial.number]).generate_state(1)[0])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                tpe = optuna.samplers.TPESampler(
                    seed=seed, n_startup_trials=self.n_startup_trials, constant_liar=True
                )
            self._current = (trial.number, tpe)
        return self._current[1]

    def infer_relative_search_space(self, study, trial):
        return self._sampler(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._sampler(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._sampler(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self._sampler(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self._sampler(trial).after_trial(study, trial, state, values)


def make_sampler(seed: int, budget: int) -> TrialSeededTPE:
    """TPE with a third of the budget (at least two trials) drawn at random first."""
    return TrialSeededTPE(seed, n_startup_trials=max(2, budget // 3))


def make_pruner(kind: str, budget: int, steps: int) -> optuna.pruners.BasePruner:
    """Median (after a quarter of the budget has finished) or Hyperband over `steps` epochs (or CV folds)."""
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=max(2, budget // 4), n_warmup_steps=1)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(steps, 1), reduction_factor=3)
    return optuna.pruners.NopPruner()  # "none": the config's Literal type admits nothing else
