"""Every figure is written, non-empty and labelled, and its CSV holds the numbers the stores hold for the runs
behind it (read back here with MlflowClient and Optuna, not through bench); retrieval frames match a
brute-force search."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from matplotlib.colors import to_rgba
from mlflow.tracking import MlflowClient
from PIL import Image
from scipy import stats

from bench.data import EvalSplit
from bench.data.omniglot import TensorImages
from bench.report import figures, gradients, retrieval_figure, runs, tables

REPORT_FIGURES = [
    "recall_at_k_folder",
    "val_map_at_r_folder",
    "optuna_smooth_ap",
    "optuna_triplet",
    "smooth_ap_temperature",
    "ablation_loss_params_temperature",
    "retrieval_examples_smooth_ap",
]
GRAD_FIGURES = ["sigmoid_vs_step", "grad_by_rank", "grad_norm"]


def assert_drawn(png, pdf) -> None:
    with Image.open(png) as image:
        grey = np.asarray(image.convert("L"))
    assert grey.shape[0] > 200 and grey.shape[1] > 200, png
    assert (grey < 128).mean() > 0.005, f"{png} is (almost) blank"
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 2000, pdf


def test_every_report_figure_is_written_and_drawn(report_dir):
    for stem in REPORT_FIGURES:
        assert_drawn(report_dir / f"{stem}.png", report_dir / f"{stem}.pdf")
        assert len(pd.read_csv(report_dir / f"{stem}.csv")) > 0, f"{stem} has no data beside it"
    assert not list(report_dir.parent.glob(".*staging*")), "staging folder left behind"


def test_every_grad_figure_is_written_with_its_data(grad_dir):
    for stem in GRAD_FIGURES:
        assert_drawn(grad_dir / f"{stem}.png", grad_dir / f"{stem}.pdf")
        assert len(pd.read_csv(grad_dir / f"{stem}.csv")) > 0


def assert_labelled(fig) -> None:
    axes = fig.get_axes()
    assert axes
    for ax in axes:
        assert ax.get_xlabel().strip() and ax.get_ylabel().strip(), ax.get_title()


def test_figure_functions_label_their_axes(store, grad_dir):
    tracker = runs.open_store(store.uri, store.experiment)
    final = runs.final_runs(tracker)
    summary, metrics = tables.comparison_table(final)
    assert_labelled(figures.recall_figure(summary, metrics, "folder"))
    assert_labelled(
        figures.curves_figure(runs.metric_histories(tracker, final, "val/map_at_r"), "MAP@R", "t")[0]
    )
    assert_labelled(gradients.grad_norm_figure(runs.metric_histories(tracker, final, "train/grad_norm"))[0])
    studies = runs.optuna_studies(store.optuna, store.experiment, final)
    assert sorted(studies) == ["smooth_ap", "triplet"]
    for loss, study in studies.items():
        fig, data = figures.optuna_figure(study, loss)
        assert_labelled(fig)
        if loss == "smooth_ap":  # six complete trials, two varying parameters: importances sum to 1
            weights = data.filter(like="importance:").iloc[0]
            assert len(weights) == 2 and weights.sum() == pytest.approx(1.0)
        else:  # one trial: a note instead of bars
            assert "at least 2 complete trials" in " ".join(t.get_text() for t in fig.axes[1].texts)
    trials = runs.trials_frame(studies["smooth_ap"])
    fig, data = figures.temperature_figure(trials, "temperature")
    assert_labelled(fig)
    assert len(data) == 6 and fig.axes[0].get_xscale() == "log"  # the pruned trial is left out
    ablation = tables.ablation_table(runs.ablation_runs(tracker), "map_at_r")
    assert_labelled(figures.ablation_figure(ablation, "map_at_r"))
    assert_labelled(gradients.sigmoid_figure()[0])
    profile = pd.read_csv(grad_dir / "grad_by_rank.csv")
    assert_labelled(gradients.rank_gradient_figure(profile, ["smooth_ap", "contrastive", "triplet"]))


def test_sigmoid_data_matches_finite_differences(grad_dir):
    data = pd.read_csv(grad_dir / "sigmoid_vs_step.csv")
    assert sorted(data["curve"].unique()) == ["T=0.001", "T=0.01", "T=0.1", "T=1", "step"]
    for t in (1.0, 0.1, 0.01, 0.001):
        part = data[data["temperature"] == t].sort_values("x")
        x = part["x"].to_numpy()

        def sigmoid(z: np.ndarray, t: float = t) -> np.ndarray:
            with np.errstate(over="ignore"):
                return 1 / (1 + np.exp(-z / t))

        assert np.allclose(part["value"], sigmoid(x), atol=1e-5)
        h = 1e-4 * t
        difference_quotient = (sigmoid(x + h) - sigmoid(x - h)) / (2 * h)
        assert np.allclose(part["derivative"], difference_quotient, rtol=1e-4, atol=1e-6)
        assert part.loc[part["x"].abs().idxmin(), "derivative"] == pytest.approx(0.25 / t, rel=1e-5)


def test_gradient_profile_covers_every_pair_of_the_batch(grad_dir):
    profile = pd.read_csv(grad_dir / "grad_by_rank.csv")
    states = profile.groupby("loss")["state"].unique().apply(sorted).to_dict()
    assert states == {
        "contrastive": ["initial"],
        "smooth_ap": ["initial", "trained"],
        "triplet": ["initial", "trained"],
    }  # contrastive's final run logged no checkpoint
    batch, per_class = 12, 3  # the store's training config: 4 classes x 3 images
    for _, part in profile.groupby(["loss", "state"]):
        assert part["pairs"].sum() == batch * (batch - 1)
        assert part[part["is_positive"]]["pairs"].sum() == batch * (per_class - 1)
        assert part["rank"].min() == 1 and part["rank"].max() == batch - 1
    smooth_trained = profile[(profile["loss"] == "smooth_ap") & (profile["state"] == "trained")]
    assert smooth_trained["mean_abs_grad"].max() > 0


class Flatten(torch.nn.Module):
    """An 'embedding network' whose ranking is known: the normalised pixels."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(images.flatten(1), dim=1)


def test_retrieval_frames_match_brute_force_search():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(5), 4)
    centres = rng.normal(size=(5, 16))
    centres[1] = centres[0] + 0.3 * rng.normal(size=16)  # two confusable classes: some retrievals go wrong
    vectors = centres[labels] + 0.6 * rng.normal(size=(20, 16))
    images = torch.tensor(vectors, dtype=torch.float32).reshape(20, 1, 4, 4)
    split = EvalSplit("test", TensorImages(images, labels))
    fig, data = retrieval_figure.retrieval_examples(Flatten(), split, n_queries=5, k=5, seed=3)

    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    queries = sorted(data["query"].unique())
    assert len(queries) == 5
    grid = np.array(fig.axes).reshape(5, 6)
    for r, q in enumerate(queries):
        top = np.argsort(-sims[q], kind="stable")[:5]
        assert data[data["query"] == q].sort_values("rank")["item"].tolist() == top.tolist()
        for c, item in enumerate(top):
            colour = retrieval_figure.RIGHT if labels[item] == labels[q] else retrieval_figure.WRONG
            assert grid[r, c + 1].patches[0].get_edgecolor() == to_rgba(colour)
    assert not data["correct"].all() and data["correct"].any()  # both frame colours are exercised
    assert grid[0, 0].get_title() == "query" and grid[0, 5].get_title() == "top 5"


def finished_runs(store, stage: str) -> tuple[MlflowClient, list]:
    client = MlflowClient(store.uri)
    experiment = client.get_experiment_by_name(store.experiment)
    query = f"tags.stage = '{stage}' and attributes.status = 'FINISHED'"
    return client, client.search_runs([experiment.experiment_id], query, max_results=1000)


def t_half_width(values: list[float]) -> float:
    """95% Student-t half-width over seeds; NaN for a single value."""
    if len(values) < 2:
        return math.nan
    return stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values))


def assert_close(actual: float, expected: float) -> None:
    """The CSVs keep 6 significant digits; NaN must stay NaN."""
    if math.isnan(expected):
        assert math.isnan(actual)
    else:
        assert actual == pytest.approx(expected, rel=6e-6, abs=1e-12)


def test_recall_figure_data_is_the_final_runs_test_recall(store, report_dir):
    _, finals = finished_runs(store, "final")
    data = pd.read_csv(report_dir / "recall_at_k_folder.csv")
    expected = {}
    for run in finals:
        for k in (1, 2, 4, 8):
            expected.setdefault((run.data.params["loss"], k), []).append(
                run.data.metrics[f"test/recall_at_{k}"]
            )
    assert sorted(zip(data["loss"], data["k"], strict=True)) == sorted(expected)
    for row in data.itertuples():
        values = expected[(row.loss, row.k)]
        assert row.n_seeds == len(values)
        assert_close(row.mean, float(np.mean(values)))
        assert_close(row.ci95, t_half_width(values))


def curve_data_from_mlflow(store, key: str) -> dict[tuple[str, int], list[float]]:
    """(loss, 1-based epoch) -> the metric's value in every final run at that epoch."""
    client, finals = finished_runs(store, "final")
    values: dict[tuple[str, int], list[float]] = {}
    for run in finals:
        for metric in client.get_metric_history(run.info.run_id, key):
            values.setdefault((run.data.params["loss"], metric.step + 1), []).append(metric.value)
    return values


@pytest.mark.parametrize(
    ("folder", "stem", "key"),
    [("report", "val_map_at_r_folder", "val/map_at_r"), ("grad", "grad_norm", "train/grad_norm")],
)
def test_curve_figure_data_is_the_runs_metric_history(store, report_dir, grad_dir, folder, stem, key):
    data = pd.read_csv((report_dir if folder == "report" else grad_dir) / f"{stem}.csv")
    expected = curve_data_from_mlflow(store, key)
    assert sorted(zip(data["loss"], data["epoch"], strict=True)) == sorted(expected)
    for row in data.itertuples():
        values = expected[(row.loss, row.epoch)]
        assert row.n_seeds == len(values)
        for column, value in (("mean", np.mean(values)), ("min", min(values)), ("max", max(values))):
            assert_close(getattr(row, column), float(value))


def complete_trials(store, loss: str) -> list:
    (name,) = [n for n in optuna.get_all_study_names(store.optuna) if n.endswith(f"-{loss}")]
    study = optuna.load_study(study_name=name, storage=store.optuna)
    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


@pytest.mark.parametrize("loss", ["smooth_ap", "triplet"])
def test_optuna_figure_data_is_the_studys_complete_trials(store, report_dir, loss):
    data = pd.read_csv(report_dir / f"optuna_{loss}.csv")
    trials = complete_trials(store, loss)
    assert data["trial"].tolist() == [t.number for t in trials]
    best = -math.inf
    for row, trial in zip(data.itertuples(), trials, strict=True):
        best = max(best, trial.value)  # both studies maximise validation MAP@R
        assert_close(row.value, trial.value)
        assert_close(row.best_so_far, best)


def test_temperature_figure_data_is_smooth_aps_complete_trials(store, report_dir):
    data = pd.read_csv(report_dir / "smooth_ap_temperature.csv")
    trials = sorted(complete_trials(store, "smooth_ap"), key=lambda t: t.params["temperature"])
    assert data["number"].tolist() == [t.number for t in trials]
    for row, trial in zip(data.itertuples(), trials, strict=True):
        assert_close(row.temperature, trial.params["temperature"])
        assert_close(row.val_map_at_r, trial.value)


def test_ablation_figure_data_is_the_ablation_runs_test_map_at_r(store, report_dir):
    _, ablations = finished_runs(store, "ablation")
    expected: dict[float, list[float]] = {}
    for run in ablations:
        expected.setdefault(float(run.data.params["ablation.value"]), []).append(
            run.data.metrics["test/map_at_r"]
        )
    data = pd.read_csv(report_dir / "ablation_loss_params_temperature.csv")
    assert sorted(data["value"]) == sorted(expected) and set(data["loss"]) == {"smooth_ap"}
    for row in data.itertuples():
        values = expected[row.value]
        assert row.n_seeds == len(values)
        assert_close(row.map_at_r_mean, float(np.mean(values)))
        assert_close(row.map_at_r_ci95, t_half_width(values))


def test_retrieval_figure_data_marks_a_result_right_exactly_when_its_label_matches(report_dir):
    data = pd.read_csv(report_dir / "retrieval_examples_smooth_ap.csv")
    assert (data["correct"] == (data["query_label"] == data["item_label"])).all()
    assert data["query"].nunique() == 6
    for _, part in data.groupby("query"):
        assert part["rank"].tolist() == [1, 2, 3, 4, 5]
