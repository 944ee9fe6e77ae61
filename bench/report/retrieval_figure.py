"""The retrieval examples figure: queries and their top-k results from a trained model, framed right or
wrong, so a reader sees what the metrics count."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from bench.report.figures import COLUMN_IN, paper_style

RIGHT, WRONG, QUERY = "#1a9641", "#d7191c", "#2b83ba"


def retrieval_examples(
    model: torch.nn.Module,
    split,
    n_queries: int = 6,
    k: int = 5,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[Figure, pd.DataFrame]:
    """Queries (left) and their top-k results, right ones framed green, wrong ones red.

    `split` is an EvalSplit (leave-one-out when it has no gallery). Queries are drawn at random (seeded) among
    those with at least one relevant item, so every row could be answered correctly.
    """
    chosen, found = _top_k(model, split, n_queries, k, seed, torch.device(device))
    gallery_set = split.gallery if split.gallery is not None else split.query
    q_labels, g_labels = np.asarray(split.query.labels), np.asarray(gallery_set.labels)
    rows = []
    with paper_style():
        fig = Figure(figsize=(COLUMN_IN, 0.58 * len(chosen) + 0.3), layout="constrained")
        axes = fig.subplots(len(chosen), k + 1, squeeze=False)
        for r, q in enumerate(chosen):
            _framed(axes[r, 0], split.query[int(q)][0], QUERY)
            for c in range(k):
                item = int(found[r, c])
                correct = bool(g_labels[item] == q_labels[q])
                _framed(axes[r, c + 1], gallery_set[item][0], RIGHT if correct else WRONG)
                rows.append(
                    {
                        "query": int(q),
                        "rank": c + 1,
                        "item": item,
                        "query_label": int(q_labels[q]),
                        "item_label": int(g_labels[item]),
                        "correct": correct,
                    }
                )
        axes[0, 0].set_title("query")
        for c in range(k):
            axes[0, c + 1].set_title(f"top {c + 1}")
        fig.suptitle(f"{split.name} split, top {k}: blue query, green right, red wrong")
    return fig, pd.DataFrame(rows)


def _top_k(
    model: torch.nn.Module, split, n_queries: int, k: int, seed: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """The chosen queries (seeded, each with a relevant item) and each one's top-k items (leave-one-out: not
    itself)."""
    from bench.evaluate import embed
    from bench.metrics import knn

    model = model.to(device)
    gallery_set = split.gallery if split.gallery is not None else split.query
    query_emb = embed(model, split.query, device)
    gallery_emb = None if split.gallery is None else embed(model, split.gallery, device)
    q_labels, g_labels = np.asarray(split.query.labels), np.asarray(gallery_set.labels)
    counts = pd.Series(g_labels).value_counts()
    relevant = counts.reindex(q_labels).fillna(0).to_numpy() - (1 if split.gallery is None else 0)
    eligible = np.flatnonzero(relevant > 0)
    if len(eligible) == 0:
        raise ValueError(f"split {split.name!r}: no query has a relevant item to retrieve")
    chosen = np.sort(
        np.random.default_rng(seed).choice(eligible, size=min(n_queries, len(eligible)), replace=False)
    )
    if split.gallery is None:  # search only the chosen queries; drop each one from its own results
        ranked = knn(query_emb[chosen], query_emb, k + 1, backend="torch")[1].numpy()
        found = np.stack([row[row != q][:k] for row, q in zip(ranked, chosen, strict=True)])
    else:
        found = knn(query_emb[chosen], gallery_emb, k, backend="torch")[1].numpy()
    return chosen, found


def _display_image(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) float tensor -> (H, W[, 3]) in [0, 1] by per-image min-max (undoes any normalisation)."""
    array = image.detach().float().cpu().numpy()
    array = (array - array.min()) / max(float(array.max() - array.min()), 1e-12)
    return array[0] if array.shape[0] == 1 else np.transpose(array[:3], (1, 2, 0))


def _framed(ax, image: torch.Tensor, color: str) -> None:
    picture = _display_image(image)
    ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.add_patch(
        Rectangle(
            (0, 0), 1, 1, transform=ax.transAxes, fill=False, edgecolor=color, linewidth=4, clip_on=False
        )
    )
    for spine in ax.spines.values():
        spine.set_visible(False)
