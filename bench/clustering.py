"""Clustering metrics of the metric-learning literature, beside the retrieval metrics of bench.metrics.

Clustering metrics (``clustering_metrics``): k-means with as many clusters as classes, scored against the
classes by NMI and AMI (arithmetic mean of the entropies, as scikit-learn's defaults; AMI with the exact
expected mutual information) and by the pairwise F1 of Oh Song et al. (CVPR 2016), all computed from the
sparse contingency table, never from the N x N pairs.

The k-means protocol (``KMEANS_PROTOCOL``): greedy k-means++ starts (Arthur and Vassilvitskii, SODA 2007,
with 2 + ln k candidates per centre as scikit-learn), refined by faiss's Lloyd iterations, restarted from
several seeded starts, keeping the assignment of lowest objective. One random start (faiss's own
initialisation) merges and splits clusters on separable data, putting the start's noise into the metric.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import gammaln

from bench.metrics import ArrayLike, as_embeddings, as_labels, faiss

KMEANS_NITER = 20  # Lloyd iterations of each start, as pytorch-metric-learning's run_kmeans
KMEANS_RESTARTS = 3  # seeded k-means++ starts; the lowest objective is kept
KMEANS_PROTOCOL = (
    f"k-means with one cluster per class: best of {KMEANS_RESTARTS} seeded greedy k-means++ starts, "
    f"{KMEANS_NITER} Lloyd iterations each"
)


@dataclass(frozen=True)
class Contingency:
    """The sparse contingency table of classes (rows) against clusters (columns): only the non-empty cells.

    Classes and clusters are those present in the data, so no row or column sum is zero.
    """

    cells: np.ndarray  # n_ij > 0 of the non-empty cells, int64
    cell_class: np.ndarray  # row index i of each cell
    cell_cluster: np.ndarray  # column index j of each cell
    class_sizes: np.ndarray  # a_i, row sums
    cluster_sizes: np.ndarray  # b_j, column sums

    @property
    def n(self) -> int:
        return int(self.class_sizes.sum())


def contingency(labels: np.ndarray, clusters: np.ndarray) -> Contingency:
    """Count the items of each (class, cluster) pair without building the dense classes x clusters table."""
    labels, clusters = np.asarray(labels), np.asarray(clusters)
    if labels.shape != clusters.shape or labels.ndim != 1 or len(labels) == 0:
        raise ValueError(
            f"labels and clusters: expected two non-empty 1-D arrays of one length, "
            f"got shapes {labels.shape} and {clusters.shape}"
        )
    _, class_of = np.unique(labels, return_inverse=True)
    cluster_ids, cluster_of = np.unique(clusters, return_inverse=True)
    keys, cells = np.unique(class_of.astype(np.int64) * len(cluster_ids) + cluster_of, return_counts=True)
    cell_class, cell_cluster = np.divmod(keys, len(cluster_ids))
    return Contingency(
        cells.astype(np.int64),
        cell_class,
        cell_cluster,
        np.bincount(class_of).astype(np.int64),
        np.bincount(cluster_of).astype(np.int64),
    )


def entropy(sizes: np.ndarray) -> float:
    """Entropy (nats) of a partition given its part sizes."""
    n = sizes.sum()
    return float(np.log(n) - (sizes * np.log(sizes)).sum() / n)


def mutual_information(table: Contingency) -> float:
    """MI (nats) = sum_ij n_ij/N log(N n_ij / (a_i b_j)) over the non-empty cells."""
    n = table.n
    a, b = table.class_sizes[table.cell_class], table.cluster_sizes[table.cell_cluster]
    terms = table.cells / n * (np.log(table.cells) + np.log(n) - np.log(a) - np.log(b))
    return max(float(terms.sum()), 0.0)


def expected_mutual_information(table: Contingency) -> float:
    """E[MI] over random partitions with the same part sizes (Vinh, Epps and Bailey, JMLR 2010), exactly.

    E[MI] = sum_ij sum_{n_ij} n_ij/N log(N n_ij / (a_i b_j)) P(n_ij | a_i, b_j, N), with P hypergeometric,
    computed in log space. Every (i, j) pair counts, empty cells included, but the term depends only on the
    values (a_i, b_j): the loop runs over pairs of distinct row and column sums, weighted by how often each
    occurs, and is vectorised over n_ij. Memory stays O(N) whatever the table's size.
    The log-factorials of order N log N cancel, so the result carries an absolute error of about
    1e-11 for N in the thousands, as scikit-learn's does.
    """
    n = table.n
    a_values, a_counts = np.unique(table.class_sizes, return_counts=True)
    b_values, b_counts = np.unique(table.cluster_sizes, return_counts=True)
    log_factorial = gammaln(np.arange(n + 1, dtype=np.float64) + 1)
    emi = 0.0
    for a, a_count in zip(a_values.tolist(), a_counts.tolist(), strict=True):
        for b, b_count in zip(b_values.tolist(), b_counts.tolist(), strict=True):
            nij = np.arange(max(1, a + b - n), min(a, b) + 1)
            log_p = (
                log_factorial[a] + log_factorial[b] + log_factorial[n - a] + log_factorial[n - b]
                - log_factorial[n] - log_factorial[nij] - log_factorial[a - nij] - log_factorial[b - nij]
                - log_factorial[n - a - b + nij]
            )  # fmt: skip
            terms = nij / n * (np.log(n) + np.log(nij) - np.log(a) - np.log(b)) * np.exp(log_p)
            emi += a_count * b_count * float(terms.sum())
    return emi


def pairwise_f1(table: Contingency) -> float:
    """F1 over item pairs: a pair is predicted together when in one cluster, truly together when in one class.

    TP = sum_ij C(n_ij, 2); precision = TP / sum_j C(b_j, 2), recall = TP / sum_i C(a_i, 2), so
    F1 = 2 TP / (sum_j C(b_j, 2) + sum_i C(a_i, 2)). NaN when no two items share a class or a cluster.
    """

    def pairs(counts: np.ndarray) -> int:
        return int((counts * (counts - 1) // 2).sum())

    together = pairs(table.cluster_sizes) + pairs(table.class_sizes)
    return 2 * pairs(table.cells) / together if together else float("nan")


def clustering_scores(labels: ArrayLike, clusters: ArrayLike) -> dict[str, float]:
    """NMI, AMI (both with the arithmetic mean of the entropies) and pairwise F1 of a cluster assignment.

    NMI and AMI follow scikit-learn's conventions: 1 when both partitions are a single part (0 / 0), and the
    AMI denominator kept at least machine epsilon away from 0 with its sign.
    """
    labels = as_labels(labels, len(labels), "labels")
    table = contingency(labels, as_labels(clusters, len(labels), "clusters"))
    f1 = pairwise_f1(table)
    if len(table.class_sizes) == len(table.cluster_sizes) == 1:
        return {"nmi": 1.0, "ami": 1.0, "f1": f1}
    mi = mutual_information(table)
    mean_entropy = (entropy(table.class_sizes) + entropy(table.cluster_sizes)) / 2
    emi = expected_mutual_information(table)
    eps = np.finfo(np.float64).eps
    denominator = mean_entropy - emi
    denominator = min(denominator, -eps) if denominator < 0 else max(denominator, eps)
    return {"nmi": mi / mean_entropy if mi > 0 else 0.0, "ami": (mi - emi) / denominator, "f1": f1}


def kmeans_plus_plus(x: np.ndarray, n_clusters: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ centres: each new centre is the best, by the resulting objective, of 2 + ln k
    candidates drawn with probability proportional to the squared distance to the nearest centre so far."""
    n = len(x)
    trials = 2 + int(np.log(n_clusters))
    norms = (x.astype(np.float64) ** 2).sum(1)
    columns = np.ascontiguousarray(x.T)

    def squared_distances(rows: np.ndarray) -> np.ndarray:  # len(rows) x n; float32 products suffice here
        return np.maximum(norms[rows, None] + norms[None, :] - 2 * (x[rows] @ columns), 0.0)

    chosen = [int(rng.integers(n))]
    nearest = squared_distances(np.array(chosen))[0]
    for _ in range(1, n_clusters):
        total = nearest.sum()
        if total <= 0:  # every point sits on a centre: take distinct unused points
            unused = np.setdiff1d(np.arange(n), chosen)
            chosen.append(int(rng.choice(unused)))
            continue
        candidates = np.searchsorted(np.cumsum(nearest), rng.random(trials) * total)
        candidates = np.minimum(candidates, n - 1)
        updated = np.minimum(nearest[None, :], squared_distances(candidates))
        best = int(np.argmin(updated.sum(1)))
        chosen.append(int(candidates[best]))
        nearest = updated[best]
    return x[np.array(chosen)].copy()


def kmeans_assignments(
    embeddings: ArrayLike,
    n_clusters: int,
    seed: int = 0,
    niter: int = KMEANS_NITER,
    restarts: int = KMEANS_RESTARTS,
) -> np.ndarray:
    """Cluster index of each row: the lowest-objective of `restarts` k-means runs, each from seeded greedy
    k-means++ centres refined by faiss's Lloyd iterations on the CPU. The same seed gives the same assignment.

    Every point takes part (no subsampling); faiss works in blocks, so memory beyond the float32 input is
    O(n_clusters x dim) plus fixed-size distance blocks (k-means++ adds O(ln k x n) per centre).
    """
    if faiss is None:
        raise ImportError("clustering metrics need faiss (pip install faiss-cpu)")
    x = np.ascontiguousarray(as_embeddings(embeddings, "embeddings").cpu().numpy(), dtype=np.float32)
    if not 1 <= n_clusters <= len(x):
        raise ValueError(f"n_clusters: expected 1..{len(x)} (the number of embeddings), got {n_clusters}")
    if restarts < 1:
        raise ValueError(f"restarts: expected at least 1, got {restarts}")
    rng = np.random.default_rng(seed)
    best_objective, best = np.inf, None
    for _ in range(restarts):
        kmeans = faiss.Kmeans(
            x.shape[1],
            n_clusters,
            niter=niter,
            seed=int(rng.integers(2**31)),
            max_points_per_centroid=len(x),  # never subsample
            min_points_per_centroid=1,  # test classes have a few images each: no warning per evaluation
        )
        kmeans.train(x, init_centroids=kmeans_plus_plus(x, n_clusters, rng))
        distances, assigned = kmeans.index.search(x, 1)
        objective = float(distances.astype(np.float64).sum())
        if objective < best_objective:
            best_objective, best = objective, assigned[:, 0].astype(np.int64)
    return best


def clustering_metrics(
    embeddings: ArrayLike, labels: ArrayLike, seed: int = 0, niter: int = KMEANS_NITER
) -> dict[str, float]:
    """`nmi`, `ami` and `f1` of k-means (`KMEANS_PROTOCOL`) with as many clusters as classes, against the
    class labels.

    The metric-learning protocol (Oh Song et al., CVPR 2016): cluster the test embeddings, compare with the
    true classes. Seeded, so two evaluations of the same embeddings give the same numbers.
    """
    x = as_embeddings(embeddings, "embeddings")
    y = as_labels(labels, len(x), "labels")
    return clustering_scores(y, kmeans_assignments(x, len(np.unique(y)), seed, niter))
