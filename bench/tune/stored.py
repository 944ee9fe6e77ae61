"""What an Optuna storage holds for an experiment, read without creating anything: each loss's budget and
trial counts, and the studies themselves for the report.

The report reads studies only through here, so study names are built and parsed by `bench.vocabulary` alone
and nothing outside `bench.tune` opens an Optuna storage.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from bench import layout
from bench.tune.study import open_storage
from bench.vocabulary import parse_study_name, study_name


def budget_report(
    storage: str, experiment: str, loss_names: Sequence[str], widened: Sequence[str] = ()
) -> Any:
    """Per loss, the stored study's budget and its trials by state: shows that every loss had an equal
    budget. The losses in `widened` are counted in their `-widened` study."""
    import pandas as pd

    rdb = (
        None if layout.missing_sqlite(storage) else open_storage(storage)
    )  # reading must not create a database
    known = set() if rdb is None else set(optuna.get_all_study_names(rdb))
    rows = []
    for loss in loss_names:
        name = study_name(experiment, loss, widened=loss in widened)
        row: dict[str, Any] = {"loss": loss, "study": name, "budget": None, "best_value": None}
        trials: list[FrozenTrial] = []
        if name in known:
            study = optuna.load_study(study_name=name, storage=rdb)
            trials = study.get_trials(deepcopy=False)
            values = [t.value for t in trials if t.state == TrialState.COMPLETE]
            row.update(budget=study.user_attrs.get("budget"), best_value=max(values) if values else None)
        count = {state: sum(t.state == state for t in trials) for state in TrialState}
        rows.append(
            {
                **row,
                "complete": count[TrialState.COMPLETE],
                "pruned": count[TrialState.PRUNED],
                "failed": count[TrialState.FAIL],
                "running": count[TrialState.RUNNING],
                "finished": count[TrialState.COMPLETE] + count[TrialState.PRUNED],
            }
        )
    return pd.DataFrame(rows)[
        ["loss", "study", "budget", "complete", "pruned", "failed", "running", "finished", "best_value"]
    ]


def experiment_studies(
    storage: str, experiment: str, tagged: Mapping[str, str] | None = None
) -> dict[str, optuna.Study]:
    """The tuning studies keyed by loss: `<experiment>-<loss>`, or the study `tagged` names for a loss (its
    final runs' `study` tag: it wins, since bench.tune names studies after the config's name, which may
    differ from the MLflow experiment's, and a loss retuned over widened ranges has its `-widened` study).
    Empty when the storage holds none; a missing SQLite file is not created.
    """
    if layout.missing_sqlite(storage):
        return {}
    existing = set(optuna.study.get_all_study_names(storage))
    names = {}
    for name in existing:
        parsed = parse_study_name(name, experiment)
        if parsed is not None and not parsed.widened:
            names[parsed.loss] = name
    names.update({loss: name for loss, name in (tagged or {}).items() if name in existing})
    return {loss: optuna.load_study(study_name=names[loss], storage=storage) for loss in sorted(names)}
