"""Every figure is written, non-empty and labelled; retrieval frames match a brute-force search."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.colors import to_rgba
from PIL import Image

from bench.data import EvalSplit
from bench.data.omniglot import TensorImages
from bench.report import figures, gradients, runs, tables

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
    fig, data = figures.retrieval_examples(Flatten(), split, n_queries=5, k=5, seed=3)

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
            colour = figures.RIGHT if labels[item] == labels[q] else figures.WRONG
            assert grid[r, c + 1].patches[0].get_edgecolor() == to_rgba(colour)
    assert not data["correct"].all() and data["correct"].any()  # both frame colours are exercised
    assert grid[0, 0].get_title() == "query" and grid[0, 5].get_title() == "top 5"
