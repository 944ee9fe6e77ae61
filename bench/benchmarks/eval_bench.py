"""`smoothap-bench bench eval`: bench.metrics against pytorch-metric-learning's AccuracyCalculator.

Both evaluate the same synthetic embeddings, the size of a real test set, in the same run: wall time, peak
memory, and the largest difference on the metrics they share (precision@1 = our recall@1, MAP@R, R-precision).
Each evaluation runs in a fresh process, so that one's freed memory cannot hide the other's peak.

PML runs twice: with an inner-product faiss index (our similarity, so any difference is in the metric code)
and with its default L2 index. On normalised embeddings L2 ranks like the inner product, up to float rounding:
a near-tie that rounds the other way shows up as a difference of about 1/n in MAP@R.

Ours can run at several placements, `BACKEND@DEVICE` (`--backend faiss@cpu,torch@cuda,faiss@cuda`): the
embeddings live on DEVICE and the search runs there (faiss's GPU index needs faiss-gpu, the `gpu` extra), so
the GPU paths are timed against faiss on the CPU in one run. PML always runs on the CPU.
"""

from __future__ import annotations

import importlib.metadata
import os
import resource
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing import get_context

import numpy as np
import pandas as pd

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


@dataclass(frozen=True)
class EvalData:
    """The synthetic embeddings a benchmark evaluates, the size of a real test set."""

    n: int
    n_classes: int
    max_class_size: int
    dim: int = 512
    seed: int = 0

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        return synthetic_embeddings(self.n, self.dim, self.n_classes, self.seed, self.max_class_size)


SOP_TEST = EvalData(n=60502, n_classes=11316, max_class_size=12)  # Stanford Online Products test set
INATURALIST_TEST = EvalData(n=136093, n_classes=2452, max_class_size=1000)  # Smooth-AP's iNaturalist split


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
BACKENDS = ("auto", "faiss", "torch")
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class Placement:
    """Where our evaluation runs: a bench.metrics backend, and the device the embeddings live on (the search
    runs there, see bench.metrics.search_engine)."""

    backend: str
    device: str

    def __str__(self) -> str:
        return f"{self.backend}@{self.device}"


def parse_placements(text: str) -> list[Placement]:
    """`--backend`: comma-separated `BACKEND[@DEVICE]`, e.g. `faiss@cpu,torch@cuda,faiss@cuda`; the device
    defaults to cpu. The first is the reference that the others' speed-ups are given against."""
    placements = []
    for item in text.split(","):
        backend, _, device = item.strip().partition("@")
        placement = Placement(backend, device or "cpu")
        if backend not in BACKENDS or placement.device not in DEVICES:
            raise ValueError(
                f"--backend: expected BACKEND[@DEVICE] items, BACKEND one of {', '.join(BACKENDS)}, "
                f"DEVICE one of {', '.join(DEVICES)}; got {item!r}"
            )
        placements.append(placement)
    if len(set(placements)) != len(placements):
        raise ValueError(f"--backend: {text!r} names a placement twice")
    return placements


def _check_devices(placements: list[Placement]) -> None:
    """Fail before any work when a placement asks for a GPU this machine does not have."""
    if any(p.device == "cuda" for p in placements):
        import torch

        if not torch.cuda.is_available():
            cuda = ", ".join(str(p) for p in placements if p.device == "cuda")
            raise ValueError(f"--backend {cuda}: no CUDA device is available")


def _ours(x: np.ndarray, labels: np.ndarray, placement: Placement) -> tuple[dict, float, str]:
    """Our metrics of embeddings that already live on the placement's device: (metrics, seconds, engine).

    On CUDA the upload and a small warm-up evaluation (CUDA context, cuBLAS, faiss GPU resources) stay outside
    the timing, as in training, where the model has already used the GPU and evaluation starts from
    embeddings on it.
    """
    import torch

    from bench.metrics import retrieval_metrics, search_engine

    embeddings = torch.from_numpy(x).to(placement.device)
    if placement.device == "cuda":  # a few queries against the whole set: each finds itself, so R > 0
        retrieval_metrics(
            embeddings[:256], labels[:256], embeddings, labels, ks=(1,), backend=placement.backend
        )
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    # the metrics come back as Python floats, so the GPU has finished when the clock stops
    metrics = retrieval_metrics(embeddings, labels, ks=(1,), backend=placement.backend)
    seconds = time.perf_counter() - start
    return metrics, seconds, search_engine(placement.backend, embeddings.is_cuda)


def _pml(x: np.ndarray, labels: np.ndarray, knn: str) -> tuple[dict, float, str]:
    """PML's AccuracyCalculator on the CPU with a faiss `knn` ('ip' or 'l2') index: (metrics, seconds,
    engine)."""
    import faiss
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import FaissKNN

    index = faiss.IndexFlatIP if knn == "ip" else faiss.IndexFlatL2
    start = time.perf_counter()
    # k="max_bin_count": the default k=None would rank the whole gallery (n x n indices, 29 GB for SOP)
    calculator = AccuracyCalculator(
        include=tuple(SHARED_METRICS.values()),
        k="max_bin_count",
        device=torch.device("cpu"),
        knn_func=FaissKNN(index_init_fn=index),
    )
    metrics = calculator.get_accuracy(x, labels)
    return metrics, time.perf_counter() - start, "faiss-cpu"


def _evaluate(method: str | Placement, data: EvalData) -> dict:
    """One evaluation of fresh synthetic data, ours at a placement or PML's ('pml-ip', 'pml-l2'): metrics,
    seconds, the search engine used, resident memory and, on CUDA, torch's peak GPU memory."""
    import torch

    x, labels = data.embeddings()
    with _PeakRss() as rss:
        if isinstance(method, Placement):
            metrics, seconds, engine = _ours(x, labels, method)
        else:
            metrics, seconds, engine = _pml(x, labels, method.removeprefix("pml-"))
    on_cuda = isinstance(method, Placement) and method.device == "cuda"
    extra = None if rss.start_mb is None else rss.peak_mb - rss.start_mb
    # the whole process's high-water mark, data generation and imports included (ru_maxrss is in KiB on Linux)
    max_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "metrics": metrics,
        "seconds": seconds,
        "search": engine,
        "peak_rss_mb": rss.peak_mb,
        "extra_mb": extra,
        "max_rss_mb": max_rss_mb,
        # torch's allocator only: a faiss GPU index's own memory is not counted
        "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if on_cuda else None,
    }


def _run(isolate: bool, method: str | Placement, data: EvalData) -> dict:
    if not isolate:
        return _evaluate(method, data)
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_evaluate, method, data).result()


def run_eval_bench(data: EvalData = SOP_TEST, backend: str = "auto", isolate: bool = True) -> dict:
    """Ours at each placement of `backend` (see `parse_placements`) and PML's AccuracyCalculator on the same
    data; `isolate=False` runs all in this process (tests)."""
    placements = parse_placements(backend)
    _check_devices(placements)
    setup = {
        "n": data.n,
        "dim": data.dim,
        "n_classes": data.n_classes,
        "seed": data.seed,
        "backend": backend,
        "max_class_size": data.max_class_size,
    }
    ours = {str(p): _run(isolate, p, data) for p in placements}
    pml_version = importlib.metadata.version("pytorch-metric-learning")
    rows = [
        _row("smoothap-bench", f"{p}, inner product", result, list(SHARED_METRICS))
        for p, result in ours.items()
    ]
    theirs = {knn: _run(isolate, f"pml-{knn}", data) for knn in PML_KNN}
    rows += [
        _row(f"pytorch-metric-learning {pml_version}", PML_KNN[knn], result, list(SHARED_METRICS.values()))
        for knn, result in theirs.items()
    ]
    reference = ours[str(placements[0])]["seconds"]
    return {
        "setup": setup,
        "table": pd.DataFrame(rows),
        # > 1: ours is faster
        "speed_ratio": {
            p: {k: t["seconds"] / o["seconds"] for k, t in theirs.items()} for p, o in ours.items()
        },
        "speed_up": {p: reference / o["seconds"] for p, o in ours.items()},  # against the first placement
        "max_abs_diff": {
            p: {knn: _differences(o["metrics"], t["metrics"]) for knn, t in theirs.items()}
            for p, o in ours.items()
        },
    }


def _differences(ours: dict, theirs: dict) -> dict[str, float]:
    return {k: abs(ours[k] - theirs[v]) for k, v in SHARED_METRICS.items()}


def _row(name: str, knn: str, result: dict, keys: list[str]) -> dict:
    row = {
        "implementation": name,
        "knn": knn,
        "search": result["search"],
        "seconds": result["seconds"],
        "peak_extra_mb": result["extra_mb"],
        "gpu_peak_mb": result["gpu_peak_mb"],
    }
    row.update({ours: result["metrics"][key] for ours, key in zip(SHARED_METRICS, keys, strict=True)})
    return row


def run_memory_check(data: EvalData = INATURALIST_TEST, backend: str = "auto") -> dict:
    """Our evaluation alone at iNaturalist test size, each placement of `backend` in a fresh process: time,
    peak resident memory and, on CUDA, torch's peak GPU memory."""
    placements = parse_placements(backend)
    _check_devices(placements)
    runs = {str(p): _run(True, p, data) for p in placements}
    _, labels = replace(data, dim=1).embeddings()
    return {"largest_class": int(np.bincount(labels).max()), "runs": runs}


def format_table(result: dict) -> str:
    """The comparison as a plain-text table plus, per placement of ours, its speed-up over the first and
    its speed ratio and agreement per PML variant."""
    s = result["setup"]
    lines = [
        f"bench eval: {s['n']:,} x {s['dim']} random normalised embeddings, {s['n_classes']:,} classes "
        f"(seed {s['seed']}, backend {s['backend']}), leave-one-out",
        result["table"].to_string(index=False, float_format=lambda v: f"{v:.6f}"),
    ]
    first = next(iter(result["speed_up"]))
    for placement, speed_up in result["speed_up"].items():
        if placement != first:
            lines.append(f"ours {placement}: {speed_up:.2f}x the speed of ours {first}")
    for placement, diffs_by_knn in result["max_abs_diff"].items():
        for knn, description in PML_KNN.items():
            diffs = ", ".join(f"{key} {value:.1e}" for key, value in diffs_by_knn[knn].items())
            lines.append(
                f"ours {placement} vs PML with {description}: speed ratio (PML s / ours) "
                f"{result['speed_ratio'][placement][knn]:.2f}; |ours - PML|: {diffs}"
            )
    return "\n".join(lines)
