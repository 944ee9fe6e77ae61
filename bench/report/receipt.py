"""The fairness receipt of a comparison, checked from the MLflow store before a table is rendered.

Every training run carries `fairness.*` tags (`bench.train.fairness`): a hash of its initial weights, a hash
of its batch stream and the splits it evaluated. A comparison is fair when the final runs at one seed share
both hashes (every loss started from the same network and saw the same batches) and no tuning run
(`stage=trial` or `cv_fold`) evaluated a test split. Runs without the tags (logged before receipts existed,
or not by `bench.train`) cannot be checked: the receipt lists them as unchecked rather than guessing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pandas as pd

from bench.report.runs import REFERENCE_LOSS, ReportError
from bench.report.tables import display_name
from bench.tracking import Tracker
from bench.train.fairness import BATCHES_TAG, INIT_TAG, SPLITS_TAG
from bench.vocabulary import STAGE, Stage

TRIAL_STAGES = (Stage.TRIAL, Stage.CV_FOLD)
SHOWN_CHARS = 12
ALLOW_FLAG = "--allow-unfair"
UNFAIR_MARK = (
    f"**Unfair comparison, rendered with {ALLOW_FLAG}: the fairness receipt under the table is broken.**"
)
HASHES = {"init_hash": "initial weights", "batches_hash": "batch stream"}


class UnfairComparison(ReportError):
    """The final runs at one seed differ in initial weights or batches, or a tuning run saw a test split."""


@dataclass
class Receipt:
    """`finals`: run_id, loss, dataset, seed, init_hash, batches_hash, splits (None where a tag is missing);
    `trials`: run_id, name, stage, status, splits of every tuning run of the experiment. A missing tag reads
    as NaN (pandas' string columns hold no None), so every reader checks for a string."""

    finals: pd.DataFrame
    trials: pd.DataFrame


def _tag(tags: dict[str, str], key: str) -> str | None:
    return tags.get(key) or None  # an empty value means the run could not vouch for it


def read_receipt(tracker: Tracker, final: pd.DataFrame) -> Receipt:
    """The receipt tags of `final` (rows of `runs.final_runs`) and of every tuning run in the experiment."""
    tags = {run.info.run_id: run.data.tags for run in tracker.find_runs(tags={STAGE: Stage.FINAL})}
    finals = final[["run_id", "loss", "dataset", "seed"]].copy()
    for column, key in (("init_hash", INIT_TAG), ("batches_hash", BATCHES_TAG), ("splits", SPLITS_TAG)):
        finals[column] = [_tag(tags.get(run_id, {}), key) for run_id in finals["run_id"]]
    trials = [
        {
            "run_id": run.info.run_id,
            "name": run.info.run_name,
            "stage": stage,
            "status": run.info.status,
            "splits": _tag(run.data.tags, SPLITS_TAG),
        }
        for stage in TRIAL_STAGES
        for run in tracker.find_runs(tags={STAGE: stage})
    ]
    return Receipt(finals, pd.DataFrame(trials, columns=["run_id", "name", "stage", "status", "splits"]))


def _short(value: str) -> str:
    return f"`{value[:SHOWN_CHARS]}`"


def _finals_of(receipt: Receipt, dataset: str | None) -> pd.DataFrame:
    finals = receipt.finals
    return finals if dataset is None else finals[finals["dataset"] == dataset]


def _tested(splits: object) -> bool:
    """Whether a run's splits tag names a test split; a run that never logged it (killed before its first
    evaluation ended, or logged before receipts existed) named none."""
    return isinstance(splits, str) and any(name.startswith("test") for name in splits.split(","))


def breaches(receipt: Receipt, dataset: str | None = None) -> list[str]:
    """What breaks the receipt (of one dataset's comparison, or all), each naming the runs involved."""
    found = []
    finals = _finals_of(receipt, dataset)
    for column, what in HASHES.items():
        checked = finals[finals[column].notna()]
        for (name, seed), part in checked.groupby(["dataset", "seed"], sort=True):
            if part[column].nunique() > 1:
                groups = "; ".join(
                    f"{_short(value)} " + ", ".join(f"{r.loss} (run {r.run_id})" for r in group.itertuples())
                    for value, group in part.groupby(column, sort=True)
                )
                found.append(f"{name} seed {seed}: {what} differ: {groups}")
    for trial in receipt.trials[receipt.trials["splits"].map(_tested)].itertuples():
        found.append(
            f"tuning run {trial.name} (run {trial.run_id}, stage={trial.stage}) evaluated {trial.splits}"
        )
    return found


def enforce(receipt: Receipt, allow_unfair: bool = False) -> list[str]:
    """The breaches, for the report to mark; raises UnfairComparison naming them unless `allow_unfair`."""
    found = breaches(receipt)
    if found and not allow_unfair:
        raise UnfairComparison(
            "refusing to compare: " + " | ".join(found) + f" (re-run those runs, or pass {ALLOW_FLAG} to "
            "render the comparison marked as unfair)"
        )
    return found


def _hash_text(part: pd.DataFrame, column: str) -> str:
    """One seed's hash of one kind: shared, or the values with the losses holding each; runs without it are
    named as unchecked."""
    checked = part[part[column].notna()]
    values = checked[column].unique()
    if len(values) == 0:
        return f"{HASHES[column]} not recorded"
    if len(values) == 1:
        text = f"{HASHES[column]} {_short(values[0])}" + (" (shared)" if len(checked) > 1 else "")
    else:
        groups = "; ".join(
            f"{_short(value)} " + ", ".join(display_name(loss) for loss in group["loss"])
            for value, group in checked.groupby(column, sort=True)
        )
        text = f"{HASHES[column]} **differ** ({groups})"
    missing = part.loc[part[column].isna(), "loss"]
    if len(missing):
        text += f", unchecked for {', '.join(display_name(loss) for loss in missing)}"
    return text


def _trials_text(trials: pd.DataFrame) -> str:
    if trials.empty:
        return "- tuning: no trial runs in this experiment"
    tagged = trials[trials["splits"].notna()]
    counts = ", ".join(f"{splits} ({n})" for splits, n in sorted(Counter(tagged["splits"]).items()))
    runs = f"{len(trials)} trial run" + ("s" if len(trials) > 1 else "")
    text = f"- tuning: {runs}; splits evaluated: {counts or 'none recorded'}"
    untagged = trials[trials["splits"].isna()]
    if len(untagged):
        unfinished = int((untagged["status"] != "FINISHED").sum())
        text += f" ({len(untagged)} without a receipt" + (
            f", {unfinished} of them unfinished: killed, failed or still running)" if unfinished else ")"
        )
    tested = tagged[tagged["splits"].map(_tested)]
    if tested.empty:
        return text + "; none evaluated a test split"
    names = ", ".join(f"{t.name} (run {t.run_id})" for t in tested.itertuples())
    return text + f"; **{len(tested)} evaluated a test split**: {names}"


def render(receipt: Receipt, dataset: str | None = None) -> str:
    """The receipt as Markdown (a list, not a table: the comparison table stays the file's only table)."""
    lines = [
        f"**Fairness receipt** (the runs' `fairness.*` tags; hashes: the first {SHOWN_CHARS} hex digits "
        "of SHA-256). At each seed every loss must start from the same initial weights and see the same "
        "batch stream (the sampled indices and augmentation seed of every epoch); no tuning run may "
        "evaluate a test split.",
        "",
    ]
    finals = _finals_of(receipt, dataset)
    finals = finals.sort_values("loss", key=lambda loss: loss.map(lambda n: (n != REFERENCE_LOSS, n)))
    has_receipt = finals["init_hash"].notna() | finals["batches_hash"].notna()
    for seed, part in finals[has_receipt].groupby("seed", sort=True):
        losses = ", ".join(display_name(loss) for loss in part["loss"])
        hashes = ", ".join(_hash_text(part, column) for column in HASHES)
        lines.append(f"- seed {seed} ({losses}): {hashes}")
    lines.append(_trials_text(receipt.trials))
    unchecked = finals[~has_receipt]
    if len(unchecked):
        runs = ", ".join(
            f"{display_name(r.loss)} seed {r.seed} (run {r.run_id})" for r in unchecked.itertuples()
        )
        lines.append(f"- without a receipt, unchecked: {runs}")
    found = breaches(receipt, dataset)
    if found:
        lines += ["", f"**Broken** (rendered anyway with {ALLOW_FLAG}):", *(f"- {text}" for text in found)]
    return "\n".join(lines) + "\n"
