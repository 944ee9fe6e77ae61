"""Retrieval metrics of the metric-learning literature over an exact inner-product k-NN.

Definitions (Musgrave et al., "A Metric Learning Reality Check", ECCV 2020):

* For a query q, the gallery ranked by similarity gives relevance flags rel(1), rel(2), ... (same label as q).
* R(q) = number of gallery items with q's label; in leave-one-out (no gallery) the query itself is not
  counted.
* ``recall_at_{k}``: 1 if any of the top k items is relevant (the "Recall@K" of metric-learning papers, which
  is not the recall of information retrieval), averaged over queries.
* ``r_precision``: (number of relevant items among the top R) / R.
* ``map_at_r``: (1 / R) * sum_{i=1..R} P(i) * rel(i), with P(i) the precision of the top i.

Conventions, chosen so that ``recall_at_1`` equals pytorch-metric-learning's ``precision_at_1``:

* Similarity is the inner product of the embeddings as given. The models L2-normalise their output, so this is
  cosine similarity; nothing is renormalised here (unnormalised input is ranked by raw inner product).
* Queries with R = 0 (the only image of their class in leave-one-out, or a class absent from the gallery) are
  left out of every average, recall@k included, as AccuracyCalculator does. If every query has R = 0 the
  metrics are undefined and a ValueError is raised.
* Leave-one-out removes the query by index, never by distance: an exact duplicate of the query still counts.
* Ties: items are ranked by similarity (as computed in float32), descending, then by gallery index, ascending.
  Both backends implement this exactly, whatever order faiss returns tied items in.
* A k larger than the number of candidates means "all candidates".
* The search runs where the embeddings are: CUDA tensors on the GPU (faiss's GPU index with faiss-gpu, else
  the chunked torch search), numpy arrays and CPU tensors on the CPU; see ``search_engine``.
Clustering metrics live beside these, in bench.clustering.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

try:
    import faiss
except ImportError:  # faiss is a dependency, but the torch backend must work without it
    faiss = None

Backend = Literal["auto", "faiss", "torch"]
Engine = Literal["torch", "faiss-cpu", "faiss-gpu"]  # what a backend resolves to (torch: where the data is)
ArrayLike = np.ndarray | torch.Tensor

_BUDGET_BYTES = 512 * 2**20  # working memory per query chunk on the CPU, and the least on a GPU
_GPU_FREE_SHARE = 0.5  # on a GPU a chunk may take this share of the free memory
_TORCH_BYTES_PER_PAIR = 28  # float32 sims + int32 bits + int64 key + int64 temporaries, per (query, item)
_FAISS_GPU_MAX_K = 2048  # largest k a faiss GPU index selects
_LOW32 = 0xFFFFFFFF


# ----------------------------------------------------------------------------------------------- input checks


def as_embeddings(x: ArrayLike, name: str) -> torch.Tensor:
    """A 2-D float32 tensor with finite values (NaN would make the ranking meaningless)."""
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}")
    if t.ndim != 2:
        raise ValueError(f"{name}: expected shape (n, dim), got {tuple(t.shape)}")
    if not (t.is_floating_point() or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64)):
        raise TypeError(f"{name}: expected real numbers, got dtype {t.dtype}")
    t = t.detach().to(torch.float32).contiguous()
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return t


def as_labels(y: ArrayLike, n: int, name: str) -> np.ndarray:
    arr = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if arr.ndim != 1 or len(arr) != n:
        raise ValueError(f"{name}: expected {n} labels in a 1-D array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name}: expected integer class labels, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


# ------------------------------------------------------------------------------------------------ ranking key


def _ranking_key(sims: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """int64 keys whose descending order is (similarity descending, gallery index ascending).

    The float32 bit pattern, with negative numbers' magnitude bits flipped, orders like the float; -0.0 is
    first turned into +0.0 so that equal similarities are equal keys. The low 32 bits hold the inverted index.
    """
    bits = (sims.to(torch.float32) + 0.0).view(torch.int32)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return bits.to(torch.int64) * (1 << 32) + (_LOW32 - indices)


def _index_from_key(key: torch.Tensor) -> torch.Tensor:
    return _LOW32 - (key & _LOW32)


# ------------------------------------------------------------------------------------------------- searchers


class _TorchSearcher:
    """Exact top-k from a (chunk x gallery) similarity matrix.

    A float top-k (k + 1) finds the candidates; sorting them by unique int64 keys applies the tie rule, and
    rows where a tie crosses the cut are redone with a top-k over the keys of the whole row.
    """

    def __init__(self, gallery: torch.Tensor):
        self.gallery = gallery
        self.device = gallery.device  # where results come back
        self.ids = torch.arange(len(gallery), device=gallery.device)

    def search(
        self, query: torch.Tensor, k: int, self_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with exact_products(self.device):
            sims = query.to(self.device) @ self.gallery.T
        if self_ids is not None:  # ranks the query itself last, below every finite similarity
            sims[torch.arange(len(sims), device=self.device), self_ids.to(self.device)] = -torch.inf
        fetch = min(len(self.gallery), k + 1)
        top_sims, top_ids = torch.topk(sims, fetch, dim=1)
        order = _ranking_key(top_sims, top_ids).argsort(dim=1, descending=True)
        top_sims, top_ids = top_sims.gather(1, order), top_ids.gather(1, order)
        if fetch > k:
            crossing = (top_sims[:, k - 1] == top_sims[:, k]).nonzero().squeeze(1)
            if len(crossing):
                key = _ranking_key(sims[crossing], self.ids)
                exact_ids = _index_from_key(torch.topk(key, k, dim=1).values)
                top_ids[crossing, :k] = exact_ids
                top_sims[crossing, :k] = sims[crossing].gather(1, exact_ids)
        return top_sims[:, :k], top_ids[:, :k]


class _FaissSearcher:
    """faiss IndexFlatIP (on every GPU faiss sees when `on_gpu`), with the tie rule restored afterwards.

    faiss returns the exact top-k values but any subset of the items tied at the k-th value, in any order.
    One extra neighbour tells whether a tie crosses the cut; rows where it does are recomputed by the torch
    searcher.
    """

    def __init__(self, gallery: torch.Tensor, on_gpu: bool):
        self.n = len(gallery)
        self.device = torch.device("cpu")  # where results come back
        gallery_cpu = gallery.cpu()
        index = faiss.IndexFlatIP(gallery_cpu.shape[1])
        self.on_gpu = on_gpu
        if on_gpu:
            index = faiss.index_cpu_to_all_gpus(index)
        index.add(gallery_cpu.numpy())
        self.index = index
        # ties across the cut, and k beyond what a faiss GPU index selects, are done by torch where the
        # embeddings live
        self.exact = _TorchSearcher(gallery)

    def search(
        self, query: torch.Tensor, k: int, self_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        query = query.cpu()
        # the top `need` under the tie rule, the query itself still among them in leave-one-out
        need = k + (self_ids is not None)
        fetch = min(self.n, need + 1)
        if self.on_gpu and fetch > _FAISS_GPU_MAX_K:
            sims, ids = self.exact.search(query, k, self_ids)
            return sims.cpu(), ids.cpu()
        sims_np, ids_np = self.index.search(query.numpy(), fetch)
        sims, ids = torch.from_numpy(sims_np), torch.from_numpy(ids_np)
        order = _ranking_key(sims, ids).argsort(dim=1, descending=True)
        sims, ids = sims.gather(1, order), ids.gather(1, order)
        if fetch < self.n:
            crossing = sims[:, need - 1] == sims[:, need]
            if crossing.any():
                rows = crossing.nonzero().squeeze(1)
                exact_sims, exact_ids = self.exact.search(query[rows], need, None)
                sims[rows, :need], ids[rows, :need] = exact_sims.cpu(), exact_ids.cpu()
        sims, ids = sims[:, :need], ids[:, :need]
        if self_ids is None:
            return sims, ids
        return _drop_self(sims, ids, self_ids.cpu())


def _drop_self(
    sims: torch.Tensor, ids: torch.Tensor, self_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """From each row's top k+1, drop the query's own index, or the last item when the query is not there."""
    drop = ids == self_ids[:, None]
    drop[~drop.any(dim=1), -1] = True
    keep = ~drop
    rows, cols = len(ids), ids.shape[1] - 1
    return sims[keep].view(rows, cols), ids[keep].view(rows, cols)


_Searcher = _TorchSearcher | _FaissSearcher


@contextmanager
def exact_products(device: torch.device) -> Iterator[None]:
    """fp32 similarity products in full precision whatever the caller set: TF32 (a 10-bit mantissa) or an
    autocast region would reorder near-ties and break the tie rule. Restored through the API the caller used
    (PyTorch raises when a read meets a mix of its legacy and new precision flags)."""
    matmul = torch.backends.cuda.matmul
    with torch.autocast(device.type, enabled=False):
        try:
            previous = matmul.allow_tf32
        except RuntimeError:  # TF32 set through the new API
            previous_precision, matmul.fp32_precision = matmul.fp32_precision, "ieee"
            try:
                yield
            finally:
                matmul.fp32_precision = previous_precision
            return
        matmul.allow_tf32 = False
        try:
            yield
        finally:
            matmul.allow_tf32 = previous


def search_engine(backend: Backend, on_cuda: bool) -> Engine:
    """What searches embeddings that live on a CUDA device (`on_cuda`) or on the CPU.

    The search runs where the embeddings are, so `--device` decides for faiss as it does for torch:
    CUDA embeddings go to faiss's GPU index when faiss has GPUs (faiss-gpu), CPU embeddings to its CPU index
    even then. auto takes faiss when it is installed, unless the embeddings are on a GPU that faiss cannot
    use: then the chunked torch search runs on that GPU. An explicit 'faiss' without faiss GPUs searches CUDA
    embeddings on the CPU.
    """
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"backend: expected 'auto', 'faiss' or 'torch', got {backend!r}")
    if backend == "faiss" and faiss is None:
        raise ImportError(
            "backend='faiss' but faiss is not installed (pip install faiss-cpu), or use backend='torch'"
        )
    if backend == "torch" or faiss is None:
        return "torch"
    if on_cuda and faiss.get_num_gpus() > 0:
        return "faiss-gpu"
    if backend == "auto" and on_cuda:
        return "torch"
    return "faiss-cpu"


def _make_searcher(gallery: torch.Tensor, backend: Backend) -> _Searcher:
    engine = search_engine(backend, gallery.is_cuda)
    return _TorchSearcher(gallery) if engine == "torch" else _FaissSearcher(gallery, engine == "faiss-gpu")


def _chunk_rows(searcher: _Searcher, n_gallery: int, k: int, chunk_size: int | None) -> int:
    """Queries per chunk: what fits the working-memory budget, unless the caller says otherwise. On a GPU the
    budget is a share of its free memory: a fixed 512 MiB let 19 queries a chunk search a 1M gallery, which
    then was read 52k times."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size: expected a positive integer, got {chunk_size}")
        return chunk_size
    if isinstance(searcher, _TorchSearcher):
        budget = _BUDGET_BYTES
        if searcher.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(searcher.device)
            budget = max(budget, int(free * _GPU_FREE_SHARE))
        return max(1, budget // (n_gallery * _TORCH_BYTES_PER_PAIR))
    return max(1, min(16384, _BUDGET_BYTES // ((k + 2) * 48)))


# ------------------------------------------------------------------------------------------------ public API


def knn(
    query: ArrayLike,
    gallery: ArrayLike | None,
    k: int,
    exclude_self: bool = False,
    backend: Backend = "auto",
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k gallery items by inner product per query: (similarities float32, indices int64), each (n, k).

    `gallery=None` searches the queries themselves. `exclude_self=True` means query i is gallery item i (the
    queries are the first rows of the gallery) and must not retrieve itself. Rows are ordered by the module's
    tie rule. Results are on the CPU, except when torch searches CUDA tensors (see `search_engine`).
    """
    q = as_embeddings(query, "query")
    g = q if gallery is None else as_embeddings(gallery, "gallery")
    if g.shape[1] != q.shape[1]:
        raise ValueError(f"gallery: dimension {g.shape[1]} differs from the queries' {q.shape[1]}")
    if exclude_self and len(q) > len(g):
        raise ValueError(f"exclude_self: {len(q)} queries cannot be the first rows of a gallery of {len(g)}")
    candidates = len(g) - int(exclude_self)
    if not 1 <= k <= candidates:
        raise ValueError(f"k: expected 1..{candidates} (gallery items a query can retrieve), got {k}")
    searcher = _make_searcher(g, backend)
    rows = _chunk_rows(searcher, len(g), k, chunk_size)
    parts = []
    for start in range(0, len(q), rows):
        self_ids = torch.arange(start, min(start + rows, len(q))) if exclude_self else None
        parts.append(searcher.search(q[start : start + rows], k, self_ids))
    return torch.cat([s for s, _ in parts]), torch.cat([i for _, i in parts])


@dataclass
class _Sums:
    """Per-metric sums over the evaluated queries, so chunks can be dropped once counted."""

    recall: dict[int, float]
    map_at_r: float = 0.0
    r_precision: float = 0.0
    queries: int = 0

    def add(self, retrieved: torch.Tensor, labels: torch.Tensor, r: torch.Tensor) -> None:
        rel = retrieved == labels[:, None]  # (queries, k) relevance of each retrieved item
        ranks = torch.arange(1, rel.shape[1] + 1, device=rel.device, dtype=torch.float64)
        in_top_r = ranks[None, :] <= r[:, None]
        hits = rel & in_top_r
        precision = rel.cumsum(dim=1, dtype=torch.float64) / ranks
        self.map_at_r += float(((precision * hits).sum(dim=1) / r).sum())
        self.r_precision += float((hits.sum(dim=1, dtype=torch.float64) / r).sum())
        for k in self.recall:
            self.recall[k] += float(rel[:, :k].any(dim=1).sum())
        self.queries += len(rel)


def relevant_counts(query_labels: np.ndarray, gallery_labels: np.ndarray, leave_one_out: bool) -> np.ndarray:
    """R for each query: gallery items with its label, the query itself not counted in leave-one-out."""
    classes, counts = np.unique(gallery_labels, return_counts=True)
    pos = np.searchsorted(classes, query_labels).clip(max=len(classes) - 1)
    r = np.where(classes[pos] == query_labels, counts[pos], 0)
    return r - 1 if leave_one_out else r


def retrieval_metrics(
    query_emb: ArrayLike,
    query_labels: ArrayLike,
    gallery_emb: ArrayLike | None = None,
    gallery_labels: ArrayLike | None = None,
    ks: Sequence[int] = (1, 2, 4, 8),
    backend: Backend = "auto",
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Recall@k for each k, MAP@R and R-precision of queries against a gallery, or leave-one-out without one.

    Each query chunk is searched for max(max(ks), largest R in the chunk) neighbours and reduced to sums at
    once, so memory stays bounded by the chunk, however large the biggest class is. See the module docstring
    for the definitions and conventions (queries with R = 0 excluded, ties by gallery index, inner product as
    given).
    """
    q = as_embeddings(query_emb, "query_emb")
    q_labels = as_labels(query_labels, len(q), "query_labels")
    if (gallery_emb is None) != (gallery_labels is None):
        raise ValueError(
            "gallery_emb and gallery_labels: give both (query vs gallery) or neither (leave-one-out)"
        )
    leave_one_out = gallery_emb is None
    g = q if leave_one_out else as_embeddings(gallery_emb, "gallery_emb")
    g_labels = q_labels if leave_one_out else as_labels(gallery_labels, len(g), "gallery_labels")
    if g.shape[1] != q.shape[1]:
        raise ValueError(f"gallery_emb: dimension {g.shape[1]} differs from query_emb's {q.shape[1]}")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks: expected positive integers, got {ks}")
    if len(g) == 0:
        raise ValueError("gallery_emb: the gallery is empty")
    candidates = len(g) - int(leave_one_out)
    r = relevant_counts(q_labels, g_labels, leave_one_out)
    evaluated = np.flatnonzero(r > 0)
    if len(evaluated) == 0:
        raise ValueError(
            "query_labels: no query has a relevant item to retrieve (R = 0 for all: single-item classes, "
            "or classes absent from the gallery)"
        )

    searcher = _make_searcher(g, backend)
    k_max = min(candidates, max(ks[-1], int(r.max())))
    rows = _chunk_rows(searcher, len(g), k_max, chunk_size)
    sums = _Sums(recall=dict.fromkeys(ks, 0.0))
    g_labels_t = torch.from_numpy(g_labels).to(searcher.device)
    for start in range(0, len(evaluated), rows):
        ids = torch.from_numpy(evaluated[start : start + rows])
        r_chunk = torch.from_numpy(r[ids.numpy()])
        k = min(candidates, max(ks[-1], int(r_chunk.max())))
        _, retrieved = searcher.search(q[ids.to(q.device)], k, ids if leave_one_out else None)
        labels = torch.from_numpy(q_labels[ids.numpy()]).to(searcher.device)
        sums.add(g_labels_t[retrieved], labels, r_chunk.to(searcher.device))
    n = sums.queries
    metrics = {f"recall_at_{k}": sums.recall[k] / n for k in ks}
    metrics["map_at_r"] = sums.map_at_r / n
    metrics["r_precision"] = sums.r_precision / n
    return metrics
