"""The two report commands as library calls: `make_report` (tables and figures) and `make_grad_report`.

Both read the stores only, render everything into a fresh staging folder beside `out_dir`, and move the files
into `out_dir` only when all of them were written: a failure leaves `out_dir` as it was.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from bench import layout
from bench.report import cost, figures, gradients, receipt, retrieval_figure, runs, significance, tables
from bench.report.edges import edge_frame, edge_notes
from bench.report.runs import REFERENCE_LOSS, open_store
from bench.tracking import Tracker
from bench.vocabulary import VAL_MAP_AT_R

log = logging.getLogger(__name__)
ABLATION_METRIC = "map_at_r"
CHECKPOINT_ARTIFACT = "checkpoint/last.pt"


@contextmanager
def staged(out_dir: Path) -> Iterator[tuple[Path, list[Path]]]:
    """Yield (staging folder, list to fill with written paths); on success move them into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-staging-", dir=out_dir.parent))
    written: list[Path] = []
    try:
        yield stage, written
        out_dir.mkdir(parents=True, exist_ok=True)
        for i, path in enumerate(written):
            target = out_dir / path.relative_to(stage)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            written[i] = target
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(text))


def _write(stage: Path, written: list[Path], name: str, text: str) -> None:
    path = stage / name
    path.write_text(text)
    written.append(path)


def _save(stage: Path, written: list[Path], fig, stem: str, data: pd.DataFrame | None = None) -> None:
    written.extend(figures.save_figure(fig, stage, stem, data))


def make_report(
    tracking_uri: str | None,
    experiment: str,
    out_dir: str | Path,
    optuna_storage: str | None = layout.OPTUNA_STORAGE,
    device: str = "cpu",
    retrieval_queries: int = 6,
    allow_unfair: bool = False,
) -> list[Path]:
    """Tables and figures of `experiment`'s final, tuning and ablation runs; returns the files written.

    Each comparison table has the fairness receipt (`bench.report.receipt`) under it. Raises ReportError
    (writing nothing) when the store, the experiment or its final runs are missing, and UnfairComparison when
    the receipt is broken, unless `allow_unfair`, which renders the tables marked as unfair.
    """
    tracker = open_store(tracking_uri, experiment)
    final = runs.final_runs(tracker)
    fairness = receipt.read_receipt(tracker, final)
    receipt.enforce(fairness, allow_unfair)
    studies = runs.optuna_studies(optuna_storage, experiment, final) if optuna_storage else {}
    edges = edge_frame(studies)
    with staged(Path(out_dir)) as (stage, written):
        for dataset, part in final.groupby("dataset", sort=True):
            summary, metrics = tables.comparison_table(part)
            name = _slug(dataset)
            markdown = tables.to_markdown(summary, metrics) + edge_notes(edges, studies)
            latex = tables.to_latex(summary, metrics)
            if receipt.breaches(fairness, str(dataset)):
                markdown, latex = f"{receipt.UNFAIR_MARK}\n\n{markdown}", f"% {receipt.UNFAIR_MARK}\n{latex}"
            markdown += "\n" + receipt.render(fairness, str(dataset))
            _write(stage, written, f"comparison_{name}.md", markdown)
            _write(stage, written, f"comparison_{name}.tex", latex)
            _write(stage, written, f"comparison_{name}.csv", tables.to_csv(summary))
            recall = figures.recall_figure(summary, metrics, str(dataset))
            _save(stage, written, recall, f"recall_at_k_{name}", figures.recall_data(summary, metrics))
            history = runs.metric_histories(tracker, part, VAL_MAP_AT_R)
            if len(history):
                fig, data = figures.curves_figure(
                    history, "validation MAP@R", f"{dataset}: validation MAP@R (band: min–max over seeds)"
                )
                _save(stage, written, fig, f"val_map_at_r_{name}", data)
            _significance_and_cost(stage, written, part, studies, name)
        if studies:
            _write(stage, written, "search_edges.csv", tables.to_csv(edges))
        _optuna_figures(stage, written, studies, optuna_storage, experiment)
        _ablation_outputs(stage, written, runs.ablation_runs(tracker))
        _retrieval_figure(stage, written, tracker, final, device, retrieval_queries)
    return written


def _significance_and_cost(
    stage: Path, written: list[Path], part: pd.DataFrame, studies: dict[str, object], name: str
) -> None:
    """Each loss against Smooth-AP (Welch interval, Holm-adjusted p, seeds needed), and what each loss
    cost."""
    if REFERENCE_LOSS in set(part["loss"]) and part["loss"].nunique() > 1:
        comparisons = significance.compare_to_reference(part)
        _write(stage, written, f"significance_{name}.md", tables.significance_markdown(comparisons))
        _write(stage, written, f"significance_{name}.csv", tables.to_csv(comparisons))
    costs = cost.cost_table(part, studies)
    _write(stage, written, f"cost_{name}.md", cost.cost_markdown(costs))
    _write(stage, written, f"cost_{name}.csv", tables.to_csv(costs))


def _optuna_figures(
    stage: Path, written: list[Path], studies: dict[str, object], storage: str | None, experiment: str
) -> None:
    if not studies:
        log.warning("no Optuna studies %s-<loss> in %s: tuning figures skipped", experiment, storage)
    for loss, study in studies.items():
        fig, data = figures.optuna_figure(study, loss)
        _save(stage, written, fig, f"optuna_{_slug(loss)}", data)
    if studies:
        history = cost.best_so_far(studies)
        _save(stage, written, figures.convergence_figure(history), "tuning_convergence", history)
    if REFERENCE_LOSS in studies:
        trials = runs.trials_frame(studies[REFERENCE_LOSS])
        param = next((c for c in trials.columns if str(c).endswith("temperature")), None)
        if param is None:
            log.warning(
                "the %s study does not tune a temperature: temperature figure skipped", REFERENCE_LOSS
            )
        else:
            fig, data = figures.temperature_figure(trials, param)
            _save(stage, written, fig, "smooth_ap_temperature", data)


def _ablation_outputs(stage: Path, written: list[Path], ablations: pd.DataFrame) -> None:
    if ablations.empty:
        return
    column = f"test/{ABLATION_METRIC}"
    ablations = ablations[ablations["param"].notna() & ablations.get(column, pd.Series(dtype=float)).notna()]
    keys = ["param", "param2"] if ablations["param2"].notna().any() else ["param"]
    for key, part in ablations.groupby(keys, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        stem = "ablation_" + "_x_".join(_slug(k) for k in key if isinstance(k, str))
        table = tables.ablation_table(part, ABLATION_METRIC)
        _write(stage, written, f"{stem}.md", tables.ablation_markdown(table, ABLATION_METRIC))
        _write(stage, written, f"{stem}.csv", tables.to_csv(table))
        _save(stage, written, figures.ablation_figure(table, ABLATION_METRIC), stem)


def _checkpoints(tracker: Tracker, final: pd.DataFrame, into: Path) -> dict[str, Path]:
    """Per loss, the checkpoint of its lowest-seed final run that logged one."""
    found: dict[str, Path] = {}
    for row in final.sort_values("seed", kind="stable").itertuples():
        if row.loss not in found:
            path = tracker.download_artifact(row.run_id, CHECKPOINT_ARTIFACT, into / row.run_id)
            if path is not None:
                found[row.loss] = path
    return found


def retrieval_from_runs(
    tracker: Tracker, final: pd.DataFrame, device: str = "cpu", queries: int = 6
) -> tuple[Figure, pd.DataFrame] | None:
    """Retrieval examples on the test split from Smooth-AP's checkpoint (else another loss's); None without
    any."""
    from bench.data import load_dataset
    from bench.train import model_from_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = _checkpoints(tracker, final, Path(tmp))
        if not checkpoints:
            return None
        loss = REFERENCE_LOSS if REFERENCE_LOSS in checkpoints else sorted(checkpoints)[0]
        model, exp = model_from_checkpoint(checkpoints[loss])
    split = next(s for s in load_dataset(exp.data).tests if s.name == "test")
    fig, data = retrieval_figure.retrieval_examples(model, split, n_queries=queries, device=device)
    data.insert(0, "loss", loss)
    return fig, data


def _retrieval_figure(
    stage: Path, written: list[Path], tracker: Tracker, final: pd.DataFrame, device: str, queries: int
) -> None:
    result = retrieval_from_runs(tracker, final, device, queries)
    if result is None:
        log.warning("no final run logged a checkpoint artifact: retrieval examples skipped")
        return
    fig, data = result
    _save(stage, written, fig, f"retrieval_examples_{_slug(data['loss'].iloc[0])}", data)


def rank_profile_from_runs(tracker: Tracker, final: pd.DataFrame, seed: int = 0) -> pd.DataFrame | None:
    """Mean |dL/ds| by rank for every loss of `final`, on one real training batch, from the initial network
    (build_model with the runs' seed) and from each loss's trained checkpoint. None when no run has a
    checkpoint.
    """
    from bench.data import load_dataset
    from bench.models import build_model
    from bench.train import model_from_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = _checkpoints(tracker, final, Path(tmp))
        trained = {loss: model_from_checkpoint(path) for loss, path in checkpoints.items()}
    if not trained:
        return None
    _, exp = next(iter(trained.values()))
    per_class = exp.data.samples_per_class
    images, labels = gradients.sample_batch(
        load_dataset(exp.data).train, exp.data.batch_size // per_class, per_class, seed
    )
    initial = build_model(exp.model, int(images.shape[1]), exp.train.seed)
    frames = []
    for loss in loss_order(final):
        params = final[final["loss"] == loss].sort_values("seed")["loss_params"].iloc[0]
        frames.append(gradients.similarity_gradients(loss, params, initial, images, labels, "initial"))
        if loss in trained:
            frames.append(
                gradients.similarity_gradients(loss, params, trained[loss][0], images, labels, "trained")
            )
    return gradients.rank_profile(pd.concat(frames, ignore_index=True))


def loss_order(final: pd.DataFrame) -> list[str]:
    """Smooth-AP first, then the other losses by registry name."""
    return sorted(final["loss"].unique(), key=lambda name: (name != REFERENCE_LOSS, name))


def make_grad_report(
    tracking_uri: str | None, experiment: str, out_dir: str | Path, seed: int = 0
) -> list[Path]:
    """Figure 2 (step vs sigmoids), |dL/ds| against rank per loss (initial and trained model, one real batch),
    and the embedding-gradient norm over training; each figure with its data as CSV. Returns the files
    written. The analysis is one batch per loss, so it runs on the CPU.
    """
    tracker = open_store(tracking_uri, experiment)
    final = runs.final_runs(tracker)
    with staged(Path(out_dir)) as (stage, written):
        fig, data = gradients.sigmoid_figure()
        _save(stage, written, fig, "sigmoid_vs_step", data)
        profile = rank_profile_from_runs(tracker, final, seed)
        if profile is None:
            log.warning("no final run logged a checkpoint artifact: gradient-by-rank figure skipped")
        else:
            _save(
                stage,
                written,
                gradients.rank_gradient_figure(profile, loss_order(final)),
                "grad_by_rank",
                profile,
            )
        history = runs.metric_histories(tracker, final, "train/grad_norm")
        if len(history):
            fig, data = gradients.grad_norm_figure(history)
            _save(stage, written, fig, "grad_norm", data)
    return written
