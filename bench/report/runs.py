"""Read what the report needs from the stores: final and ablation runs from MLflow (through the tracker),
studies from Optuna (through bench.tune).

Everything is returned as plain pandas frames, so tables and figures never talk to MLflow themselves and tests
can check them against numbers read back independently.
"""

from __future__ import annotations

import pandas as pd
import yaml
from mlflow.entities import Run

from bench import layout
from bench.tracking import MissingExperiment, Tracker, redact
from bench.vocabulary import STAGE, STUDY, SUPERSEDED_BY, Stage

REFERENCE_LOSS = "smooth_ap"
RUN_COLUMNS = ["run_id", "loss", "dataset", "seed"]


class ReportError(ValueError):
    """The store holds nothing a report can be made from; the message says what is missing and where."""


def open_store(tracking_uri: str | None, experiment: str) -> Tracker:
    """A read-only tracker on an existing store and experiment; a missing one is a ReportError, never
    created."""
    uri = layout.tracking_uri(tracking_uri)
    if layout.missing_sqlite(uri):
        raise ReportError(f"no MLflow store at {uri} (file {layout.sqlite_path(uri)} does not exist)")
    try:
        return Tracker(uri, experiment, create=False)
    except MissingExperiment as error:
        raise ReportError(str(error)) from None


def _row(run: Run) -> dict:
    params, tags = run.data.params, run.data.tags
    loss = params.get("loss") or tags.get("loss") or params.get("loss.name")
    seed = params.get("seed", params.get("train.seed"))
    row = {
        "run_id": run.info.run_id,
        "loss": loss,
        "dataset": params.get("dataset") or params.get("data.name"),
        "seed": int(seed) if seed is not None else None,
        STUDY: tags.get(STUDY),
        "batch_size": _int(params.get("data.batch_size")),
        "per_class": _int(params.get("data.samples_per_class")),
        "embedding_dim": _int(params.get("model.embedding_dim")),
        "wall_s": (run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else None,
    }
    row["loss_params"] = {
        k[len("loss.params.") :]: yaml.safe_load(v) for k, v in params.items() if k.startswith("loss.params.")
    }
    row.update(run.data.metrics)
    return row


def _int(text: str | None) -> int | None:
    return int(text) if text is not None else None


def final_runs(tracker: Tracker) -> pd.DataFrame:
    """One row per finished `stage=final` run: run_id, loss, dataset, seed and every metric's last value.
    Runs superseded by a loss's retuning over widened ranges (tag `superseded_by`) are left out."""
    runs = [
        r
        for r in tracker.find_runs(tags={STAGE: Stage.FINAL}, status="FINISHED")
        if SUPERSEDED_BY not in r.data.tags
    ]
    if not runs:
        raise ReportError(
            f"experiment {tracker.experiment!r} in {redact(tracker.uri)} has no finished runs "
            "tagged stage=final; run `smoothap-bench tune` (or `smoothap-bench run`) first"
        )
    frame = pd.DataFrame([_row(run) for run in runs])
    frame["dataset"] = frame["dataset"].fillna("unknown")  # grouped by dataset: a run must not drop out
    missing = frame[frame["loss"].isna()]
    if len(missing):
        raise ReportError(f"final runs without a `loss` param: {', '.join(missing['run_id'])}")
    return frame.sort_values(["dataset", "loss", "seed"], kind="stable").reset_index(drop=True)


def ablation_runs(tracker: Tracker) -> pd.DataFrame:
    """One row per finished `stage=ablation` run with `param`, `value` (and `param2`, `value2` for a 2-D
    grid).

    Values are parsed as floats where they are numbers, so sweeps plot on a numeric axis.
    """
    runs = tracker.find_runs(tags={STAGE: Stage.ABLATION}, status="FINISHED")
    rows = []
    for run in runs:
        row = _row(run)
        params = run.data.params
        for suffix in ("", "2"):
            key = f"ablation.param{suffix}"
            row[f"param{suffix}"] = params.get(key, run.data.tags.get(key))
            key = f"ablation.value{suffix}"
            row[f"value{suffix}"] = _number(params.get(key, run.data.tags.get(key)))
        rows.append(row)
    return pd.DataFrame(rows, columns=None if rows else [*RUN_COLUMNS, "param", "value", "param2", "value2"])


def _number(text: str | None) -> float | str | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return text


def metric_histories(tracker: Tracker, runs: pd.DataFrame, key: str) -> pd.DataFrame:
    """Per-step values of metric `key` for every run in `runs`: columns loss, dataset, seed, run_id, step,
    value."""
    rows = []
    for run in runs.itertuples():
        for metric in tracker.metric_history(run.run_id, key):
            rows.append(
                {
                    "loss": run.loss,
                    "dataset": run.dataset,
                    "seed": run.seed,
                    "run_id": run.run_id,
                    "step": metric.step,
                    "value": metric.value,
                }
            )
    return pd.DataFrame(rows, columns=["loss", "dataset", "seed", "run_id", "step", "value"])


def optuna_studies(storage: str, experiment: str, final: pd.DataFrame | None = None) -> dict[str, object]:
    """The tuning studies keyed by loss (`bench.tune.stored.experiment_studies`): `<experiment>-<loss>`, or
    the study a loss's final runs name in their `study` tag. Empty when the storage holds none."""
    from bench.tune.stored import experiment_studies

    tagged: dict[str, str] = {}
    if final is not None and STUDY in final:
        rows = final[["loss", STUDY]].dropna().drop_duplicates("loss")
        tagged = dict(zip(rows["loss"], rows[STUDY], strict=True))
    return experiment_studies(storage, experiment, tagged)


def trials_frame(study) -> pd.DataFrame:
    """A study's trials: number, state, value, and one column per parameter (as the trials named it)."""
    rows = [{"number": t.number, "state": t.state.name, "value": t.value, **t.params} for t in study.trials]
    return pd.DataFrame(rows, columns=None if rows else ["number", "state", "value"])
