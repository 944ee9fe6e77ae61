"""`smoothap-bench bench eval`: bench.metrics against pytorch-metric-learning's AccuracyCalculator.

Both evaluate the same synthetic embeddings, the size of a real test set, in the same run: wall time, peak
memory, and the largest difference on the metrics they share (precision@1 = our recall@1, MAP@R, R-precision).
Each evaluation runs in a fresh process, so that one's freed memory cannot hide the other's peak.

PML runs twice: with an inner-product faiss index (our similarity, so any difference is in the metric code)
and with its default L2 index. On normalised embeddings L2 ranks like the inner product, up to float rounding:
a near-tie that rounds the other way shows up as a difference of about 1/n in MAP@R.
"""

from __future__ import annotations

import importlib.metadata
import os
import resource
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import pandas as pd

SOP_TEST = {"n": 60502, "n_classes": 11316, "max_class_size": 12}  # Stanford Online Products test set
INATURALIST_TEST = {
    "n": 136093,
    "n_classes": 2452,
    "max_class_size": 1000,
}  # Smooth-AP's iNaturalist test split
SHARED_METRICS = {
    "recall_at_1": "precision_at_1",
    "map_at_r": "mean_average_precision_at_r",
    "r_precision": "r_precision",
}


def class_sizes(
    n: int, n_classes: int, rng: np.random.Generator, max_size: int, min_size: int = 2
) -> np.ndarray:
    """Sizes in [min_size, max_size] summing to n, skewed towards small classes as in real retrieval sets."""
    if not min_size * n_classes <= n <= max_size * n_classes:
        raise ValueError(f"n={n}: {n_classes} classes of {min_size}..{max_size} items cannot hold it")
    sizes = np.full(n_classes, min_size)
    weights = rng.exponential(size=n_classes)
    while (left := n - sizes.sum()) > 0:
        room = max_size - sizes
        p = np.where(room > 0, weights, 0.0)
        sizes += np.minimum(rng.multinomial(left, p / p.sum()), room)
    return sizes


def synthetic_embeddings(
    n: int, dim: int, n_classes: int, seed: int, max_class_size: int, noise: float = 2.5
) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised class centre + Gaussian noise (norm ~ `noise`): metrics in mid-range, not 0 or 1."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(n_classes), class_sizes(n, n_classes, rng, max_class_size)))
    centres = rng.standard_normal((n_classes, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x *= noise / np.sqrt(dim)
    x += centres[labels]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels


class _PeakRss:
    """Samples this process's resident memory in a thread (Linux /proc); None elsewhere."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.start_mb = self.peak_mb = self._rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    @staticmethod
    def _rss_mb() -> float | None:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError):
            return None

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_mb = max(self.peak_mb, self._rss_mb())

    def __enter__(self) -> _PeakRss:
        if self.start_mb is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.start_mb is not None:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, self._rss_mb())


PML_KNN = {"ip": "faiss IndexFlatIP", "l2": "faiss IndexFlatL2, PML's default"}


def _evaluate(
    method: str, n: int, dim: int, n_classes: int, seed: int, backend: str, max_class_size: int
) -> dict:
    """One evaluation of fresh synthetic data by `method` ('ours', 'pml-ip', 'pml-l2'): metrics, seconds,
    memory."""
    import faiss
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import FaissKNN

    from bench.metrics import retrieval_metrics

    x, labels = synthetic_embeddings(n, dim, n_classes, seed, max_class_size)
    with _PeakRss() as rss:
        start = time.perf_counter()
        if method == "ours":
            metrics = retrieval_metrics(x, labels, ks=(1,), backend=backend)
        else:
            index = faiss.IndexFlatIP if method == "pml-ip" else faiss.IndexFlatL2
            # k="max_bin_count": the default k=None would rank the whole gallery (n x n indices, 29 GB for
            # SOP)
            calculator = AccuracyCalculator(
                include=tuple(SHARED_METRICS.values()),
                k="max_bin_count",
                device=torch.device("cpu"),
                knn_func=FaissKNN(index_init_fn=index),
            )
            metrics = calculator.get_accuracy(x, labels)
        seconds = time.perf_counter() - start
    extra = None if rss.start_mb is None else rss.peak_mb - rss.start_mb
    # the whole process's high-water mark, data generation and imports included (ru_maxrss is in KiB on Linux)
    max_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "metrics": metrics,
        "seconds": seconds,
        "peak_rss_mb": rss.peak_mb,
        "extra_mb": extra,
        "max_rss_mb": max_rss_mb,
    }


def _run(isolate: bool, *args) -> dict:
    if not isolate:
        return _evaluate(*args)
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_evaluate, *args).result()


def run_eval_bench(
    n: int = SOP_TEST["n"],
    dim: int = 512,
    n_classes: int = SOP_TEST["n_classes"],
    seed: int = 0,
    backend: str = "auto",
    max_class_size: int = SOP_TEST["max_class_size"],
    isolate: bool = True,
) -> dict:
    """Ours and PML's AccuracyCalculator on the same data; `isolate=False` runs both in this process
    (tests)."""
    setup = {
        "n": n,
        "dim": dim,
        "n_classes": n_classes,
        "seed": seed,
        "backend": backend,
        "max_class_size": max_class_size,
    }
    args = (n, dim, n_classes, seed, backend, max_class_size)
    ours = _run(isolate, "ours", *args)
    pml_version = importlib.metadata.version("pytorch-metric-learning")
    rows = [_row("smoothap-bench", f"backend={backend}, inner product", ours, list(SHARED_METRICS))]
    speed_ratio, max_abs_diff = {}, {}
    for knn, description in PML_KNN.items():
        theirs = _run(isolate, f"pml-{knn}", *args)
        rows.append(
            _row(f"pytorch-metric-learning {pml_version}", description, theirs, list(SHARED_METRICS.values()))
        )
        speed_ratio[knn] = theirs["seconds"] / ours["seconds"]  # > 1: ours is faster
        max_abs_diff[knn] = {
            k: abs(ours["metrics"][k] - theirs["metrics"][v]) for k, v in SHARED_METRICS.items()
        }
    return {
        "setup": setup,
        "table": pd.DataFrame(rows),
        "speed_ratio": speed_ratio,
        "max_abs_diff": max_abs_diff,
    }


def _row(name: str, knn: str, result: dict, keys: list[str]) -> dict:
    row = {
        "implementation": name,
        "knn": knn,
        "seconds": result["seconds"],
        "peak_extra_mb": result["extra_mb"],
    }
    row.update({ours: result["metrics"][key] for ours, key in zip(SHARED_METRICS, keys, strict=True)})
    return row


def run_memory_check(
    n: int = INATURALIST_TEST["n"],
    dim: int = 512,
    n_classes: int = INATURALIST_TEST["n_classes"],
    seed: int = 0,
    backend: str = "auto",
    max_class_size: int = INATURALIST_TEST["max_class_size"],
) -> dict:
    """Our evaluation alone at iNaturalist test size, in a fresh process: time and peak resident memory."""
    result = _run(True, "ours", n, dim, n_classes, seed, backend, max_class_size)
    _, labels = synthetic_embeddings(n, 1, n_classes, seed, max_class_size)
    result["largest_class"] = int(np.bincount(labels).max())
    return result


def format_table(result: dict) -> str:
    """The comparison as a plain-text table plus speed-ratio and agreement lines per PML variant."""
    s = result["setup"]
    lines = [
        f"bench eval: {s['n']:,} x {s['dim']} random normalised embeddings, {s['n_classes']:,} classes "
        f"(seed {s['seed']}, backend {s['backend']}), leave-one-out",
        result["table"].to_string(index=False, float_format=lambda v: f"{v:.6f}"),
    ]
    for knn, description in PML_KNN.items():
        diffs = ", ".join(f"{key} {value:.1e}" for key, value in result["max_abs_diff"][knn].items())
        lines.append(
            f"vs PML with {description}: speed ratio (PML s / ours) {result['speed_ratio'][knn]:.2f}; "
            f"|ours - PML|: {diffs}"
        )
    return "\n".join(lines)
