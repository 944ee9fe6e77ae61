"""Gradient analysis: the paper's figure 2, where each loss spends its gradient along the ranking, and the
embedding-gradient norm over training.

The rank plot answers the paper's argument directly: Smooth-AP's dL/ds is concentrated on items ranked near
the positives (within a few temperatures), while pair and triplet losses spread theirs differently.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter

from bench.report.figures import COLUMN_IN, DOUBLE_IN, loss_color, paper_style
from bench.report.tables import display_name

TEMPERATURES = (1.0, 0.1, 0.01, 0.001)


def sigmoid_figure(
    temperatures: tuple[float, ...] = TEMPERATURES, span: float = 1.0, points: int = 801
) -> tuple[Figure, pd.DataFrame]:
    """The step function H(x) and sigmoids sig(x / T) (left), and their derivatives (right, log scale).

    x is a difference of similarities, s_j - s_i, in [-span, span]. The step's derivative is a Dirac delta
    at 0 (zero elsewhere): it is drawn as an arrow, as it has no finite value to plot.
    """
    x, data = _sigmoid_curves(temperatures, span, points)
    colors = ["#fdae61", "#d7191c", "#2c7bb6", "#5e3c99"]
    with paper_style():
        fig = Figure(figsize=(DOUBLE_IN, 2.3), layout="constrained")
        left, right = fig.subplots(1, 2)
        left.plot(
            x, (x > 0).astype(float), color="black", linewidth=2.2, label="step H(x)", drawstyle="steps-mid"
        )
        for color, t in zip(colors * 2, temperatures, strict=False):
            part = data[data["temperature"] == t]
            left.plot(part["x"], part["value"], color=color, label=f"sigmoid, τ={t:g}")
            shown = part["derivative"].where(part["derivative"] >= 1e-4)  # below the axis: not drawn
            right.plot(part["x"], shown, color=color, label=f"τ={t:g} (peak {0.25 / t:g})", zorder=3)
        right.annotate(
            "",
            xy=(0, 5e3),
            xytext=(0, 1e-4),
            zorder=2,
            arrowprops={"arrowstyle": "-|>", "color": "0.55", "linewidth": 1.0, "linestyle": "--"},
        )
        right.text(0.04 * span, 3e3, "step: Dirac δ at 0", ha="left", va="center", color="0.35")
        left.set_xlabel("x = s_j − s_i (similarity difference)")
        left.set_ylabel("H(x) or sig(x/τ)")
        left.set_title("step function and its sigmoid relaxations")
        left.legend(frameon=False, loc="upper left")
        right.set_yscale("log")
        right.set_ylim(1e-4, 1e4)
        right.set_xlabel("x = s_j − s_i (similarity difference)")
        right.set_ylabel("derivative d/dx (log)")
        right.set_title("derivatives: zero almost everywhere for the step")
        right.legend(frameon=False, loc="upper left", bbox_to_anchor=(0.0, 0.93))
        for ax in (left, right):
            ax.set_xlim(-span, span)
            ax.grid(alpha=0.3)
    return fig, data


def _sigmoid_curves(
    temperatures: tuple[float, ...], span: float, points: int
) -> tuple[np.ndarray, pd.DataFrame]:
    """The x grid (denser near 0, where the steep sigmoids turn) and each curve's value and derivative."""
    x = np.union1d(np.linspace(-span, span, points), np.linspace(-0.02 * span, 0.02 * span, points // 2 + 1))
    rows = [
        pd.DataFrame(
            {
                "curve": "step",
                "temperature": np.nan,
                "x": x,
                "value": (x > 0).astype(float),
                "derivative": 0.0,
            }
        )
    ]
    for t in temperatures:
        s = 0.5 * (1.0 + np.tanh(x / (2.0 * t)))  # sigmoid without overflow
        rows.append(
            pd.DataFrame(
                {"curve": f"T={t:g}", "temperature": t, "x": x, "value": s, "derivative": s * (1.0 - s) / t}
            )
        )
    data = pd.concat(rows, ignore_index=True)
    return x, data


def sample_batch(dataset, n_classes: int, per_class: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A P x K batch like the training sampler's: `n_classes` random classes with `per_class` items each.

    Random augmentations inside the dataset draw from torch's RNG, seeded here so the batch is reproducible.
    """
    labels = np.asarray(dataset.labels)
    classes, counts = np.unique(labels, return_counts=True)
    usable = classes[counts >= per_class]
    if len(usable) < 2:
        raise ValueError(
            f"need at least 2 classes with {per_class} items for a gradient batch, found {len(usable)}"
        )
    rng = np.random.default_rng(seed)
    picked = rng.choice(usable, size=min(n_classes, len(usable)), replace=False)
    indices = np.concatenate(
        [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in picked]
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        items = [dataset[int(i)] for i in indices]
    return torch.stack([image for image, _ in items]), torch.as_tensor([label for _, label in items])


@torch.no_grad()
def _embed(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model.eval()(images)


def similarity_gradients(
    loss_name: str,
    loss_params: dict,
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    state: str,
) -> pd.DataFrame:
    """dL/ds for every (query, item) of the batch under `loss_name`, tagged with the loss and model state."""
    import losses
    from losses.introspect import similarity_gradients as per_pair

    spec = losses.get_spec(loss_name)
    if not spec.capabilities.similarity_form:
        raise TypeError(
            f"{spec.cls.__name__} has no forward_similarities(sims, labels); add one to use introspection"
        )
    frame = per_pair(losses.get_loss(loss_name, **loss_params), _embed(model, images), labels)
    frame.insert(0, "state", state)
    frame.insert(0, "loss", loss_name)
    return frame


def rank_profile(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean |dL/ds| per (loss, state, positive/negative, rank), with the number of pairs averaged."""
    frame = frame.assign(abs_grad=frame["grad"].abs())
    return (
        frame.groupby(["loss", "state", "is_positive", "rank"])["abs_grad"]
        .agg(["mean", "count"])
        .reset_index()
        .rename(columns={"mean": "mean_abs_grad", "count": "pairs"})
    )


def rank_gradient_figure(profile: pd.DataFrame, losses: list[str]) -> Figure:
    """Rows: losses; columns: initial and trained model. Mean |dL/ds| against rank (log-log), positives solid
    in the loss's colour, negatives dashed grey. Exact zeros (pairs a miner dropped) leave gaps on the log
    axis.
    """
    states = ["initial", "trained"]
    log_x = profile["rank"].max() > 20  # big batches: the top ranks, where gradient goes, need room
    with paper_style():
        fig = Figure(figsize=(DOUBLE_IN, 0.45 + 1.3 * len(losses)), layout="constrained")
        axes = fig.subplots(len(losses), 2, squeeze=False, sharex=True)
        for r, loss in enumerate(losses):
            for c, state in enumerate(states):
                ax = axes[r, c]
                _rank_panel(ax, profile[(profile["loss"] == loss) & (profile["state"] == state)], loss)
                if log_x:
                    ax.set_xscale("log")
                ax.set_title(f"{display_name(loss)}, {state} model", loc="left")
                ax.set_ylabel("mean |dL/ds|")
                ax.grid(alpha=0.3)
                ax.set_xlabel("rank for the query (1 = most similar)" if r == len(losses) - 1 else "rank")
        handles = [Line2D([], [], color="black", linestyle="-"), Line2D([], [], color="0.3", linestyle="--")]
        fig.legend(
            handles,
            ["positives (solid, the loss's colour)", "negatives (dashed)"],
            loc="outside upper center",
            ncol=2,
            frameon=False,
        )
    return fig


def _rank_panel(ax, part: pd.DataFrame, loss: str) -> None:
    """One panel's curves: mean |dL/ds| against rank, or a note saying why there are none."""
    if part.empty:
        _note(ax, "no checkpoint logged for this loss")
        ax.set_yticks([])
    elif not (part["mean_abs_grad"] > 0).any():
        _note(ax, "dL/ds = 0 for every pair of this batch")
    else:
        for positive, style in ((True, "-"), (False, "--")):
            side = part[part["is_positive"] == positive]
            ax.plot(
                side["rank"],
                side["mean_abs_grad"],
                style,
                linewidth=1.1,
                color=loss_color(loss) if positive else "0.3",
            )
        positive_values = part["mean_abs_grad"][part["mean_abs_grad"] > 0]
        top = positive_values.max()
        ax.set_yscale("log", nonpositive="mask")
        # at least two decades, so every panel has labelled decade ticks and no crowded minor labels
        ax.set_ylim(min(positive_values.min(), top / 100) / 1.5, top * 1.5)
        ax.yaxis.set_minor_formatter(NullFormatter())


def _note(ax, text: str) -> None:
    """A grey note in the middle of an empty panel."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.35")


def grad_norm_figure(histories: pd.DataFrame) -> tuple[Figure, pd.DataFrame]:
    """The embedding-gradient norm ||dL/dE|| per epoch (batch mean), per loss, over the final runs."""
    from bench.report.figures import curves_figure

    fig, data = curves_figure(
        histories, "‖dL/d embeddings‖ (log)", "embedding gradient norm over training", log_y=True
    )
    fig.set_size_inches(COLUMN_IN, 2.6)
    return fig, data
