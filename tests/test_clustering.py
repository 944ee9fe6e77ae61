"""Clustering metrics: NMI and AMI against scikit-learn, pairwise F1 against a hand count and a brute-force
pair count, seeded k-means, and which splits evaluation clusters."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

from bench.clustering import clustering_metrics, clustering_scores, kmeans_assignments
from bench.config import EvalConfig
from bench.data import EvalSplit
from bench.data.omniglot import TensorImages
from bench.evaluate import evaluate_split
from bench.metrics import retrieval_metrics
from tests.helpers import clustered


def related_assignment(rng: np.random.Generator, n: int, n_classes: int, n_clusters: int, agree: float):
    """Labels, and clusters that follow the labels for a fraction `agree` of the items, random otherwise."""
    labels = rng.integers(0, n_classes, size=n)
    clusters = np.where(rng.random(n) < agree, labels % n_clusters, rng.integers(0, n_clusters, size=n))
    return labels, clusters


@pytest.mark.parametrize(
    ("n", "n_classes", "n_clusters", "seed"),
    [(300, 10, 7, 0), (2000, 50, 80, 1), (1000, 3, 200, 2), (1500, 40, 25, 3), (400, 60, 60, 4)],
)
def test_nmi_and_ami_equal_scikit_learn(n, n_classes, n_clusters, seed):
    labels, clusters = related_assignment(np.random.default_rng(seed), n, n_classes, n_clusters, agree=0.5)
    got = clustering_scores(labels, clusters)
    assert 0.05 < got["ami"] < 0.95  # an informative case, not a trivial 0 or 1
    assert got["nmi"] == pytest.approx(normalized_mutual_info_score(labels, clusters), abs=1e-12)
    assert got["ami"] == pytest.approx(adjusted_mutual_info_score(labels, clusters), abs=1e-12)


@pytest.mark.parametrize(
    ("labels", "clusters"),
    [
        (np.zeros(50, int), np.zeros(50, int)),  # one class, one cluster: 0 / 0, defined as 1
        (np.zeros(50, int), np.arange(50) % 4),  # one class, four clusters
        (np.arange(50) % 5, np.full(50, 7)),  # five classes, one cluster
        (np.arange(60) % 6, (np.arange(60) % 6) * 10 + 3),  # the same partition under other names
        (np.arange(40), np.arange(40) // 2),  # singletons against pairs
    ],
)
def test_degenerate_assignments_equal_scikit_learn(labels, clusters):
    got = clustering_scores(labels, clusters)
    assert got["nmi"] == pytest.approx(normalized_mutual_info_score(labels, clusters), abs=1e-12)
    assert got["ami"] == pytest.approx(adjusted_mutual_info_score(labels, clusters), abs=1e-12)


def test_pairwise_f1_hand_worked():
    # Items 0..5, classes 0 0 0 1 1 2, clusters A A B B B B.
    # Same cluster: A {01}, B {23 24 25 34 35 45} -> 7 pairs. Same class: {01 02 12}, {34} -> 4 pairs.
    # Both: 01 and 34 -> TP = 2. Precision 2/7, recall 2/4, F1 = 2 (2/7)(1/2) / (2/7 + 1/2) = 4/11.
    got = clustering_scores([0, 0, 0, 1, 1, 2], [5, 5, 9, 9, 9, 9])
    assert got["f1"] == pytest.approx(4 / 11, abs=1e-15)


def brute_force_pair_f1(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Every pair i < j, one at a time."""
    tp = same_cluster = same_class = 0
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            together, truly = clusters[i] == clusters[j], labels[i] == labels[j]
            tp += together and truly
            same_cluster += together
            same_class += truly
    precision, recall = tp / same_cluster, tp / same_class
    return 2 * precision * recall / (precision + recall)


def test_pairwise_f1_equals_brute_force_pair_count():
    labels, clusters = related_assignment(np.random.default_rng(5), 250, 12, 9, agree=0.6)
    assert clustering_scores(labels, clusters)["f1"] == pytest.approx(
        brute_force_pair_f1(labels, clusters), abs=1e-12
    )


def test_expected_mutual_information_of_an_sop_sized_table_stays_small_in_memory():
    """11,316 classes x 11,316 clusters over 60,502 items: a dense table alone would take 1 GB."""
    rng = np.random.default_rng(6)
    labels = np.concatenate([np.arange(11316).repeat(5), rng.integers(0, 11316, size=60502 - 5 * 11316)])
    clusters = np.where(rng.random(len(labels)) < 0.6, labels, rng.integers(0, 11316, size=len(labels)))
    tracemalloc.start()
    got = clustering_scores(labels, clusters)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50 * 2**20
    assert 0 < got["ami"] < got["nmi"] < 1 and 0 < got["f1"] < 1


def test_kmeans_is_seeded():
    # uniform noise has no clusters to find, so where k-means ends depends on its random start
    x = np.random.default_rng(7).standard_normal((2000, 8)).astype(np.float32)
    first = kmeans_assignments(x, 20, seed=0)
    np.testing.assert_array_equal(first, kmeans_assignments(x, 20, seed=0))
    other = kmeans_assignments(x, 20, seed=1)
    assert normalized_mutual_info_score(first, other) < 0.9  # a different partition, not a relabelling
    assert clustering_metrics(x, np.arange(2000) % 20, seed=3) == clustering_metrics(
        x, np.arange(2000) % 20, seed=3
    )


def separable_clusters(
    n_classes: int, per_class: int, dim: int, noise: float
) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors: a random centre per class plus Gaussian noise, as the issue that found one-start k-means
    merging and splitting such clusters (NMI 0.933 where scikit-learn's k-means++ reaches 1.0)."""
    torch.manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(n_classes, dim), dim=1)
    x = centres.repeat_interleave(per_class, 0) + noise * torch.randn(n_classes * per_class, dim)
    return torch.nn.functional.normalize(x, dim=1).numpy(), np.arange(n_classes).repeat(per_class)


@pytest.mark.parametrize(("n_classes", "per_class", "dim"), [(20, 10, 16), (100, 4, 32), (60, 2, 8)])
def test_separable_clusters_score_one(n_classes, per_class, dim):
    x, labels = separable_clusters(n_classes, per_class, dim, noise=0.01)
    got = clustering_metrics(x, labels)
    assert got == pytest.approx({"nmi": 1.0, "ami": 1.0, "f1": 1.0}, abs=1e-9)


def inertia(x: np.ndarray, assigned: np.ndarray) -> float:
    """The k-means objective of an assignment, in float64: squared distances to each cluster's mean."""
    x = x.astype(np.float64)
    return sum(float(((x[assigned == c] - x[assigned == c].mean(0)) ** 2).sum()) for c in np.unique(assigned))


def test_kmeans_objective_matches_scikit_learn_kmeans_plus_plus():
    """Touching blobs, where the start matters: the kept restart is as good as scikit-learn's k-means++ (best
    of 3 starts, three seeds), and far better than random starts, which merge and split clusters."""
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(10)
    labels = rng.integers(0, 40, size=1200)
    x = clustered(rng, labels, 8, noise=0.3).astype(np.float64)
    ours = inertia(x, kmeans_assignments(x, 40, seed=0))
    plus_plus = [KMeans(40, init="k-means++", n_init=3, random_state=s).fit(x).inertia_ for s in range(3)]
    random_starts = [KMeans(40, init="random", n_init=1, random_state=s).fit(x).inertia_ for s in range(3)]
    assert ours <= 1.02 * float(np.median(plus_plus))
    assert ours < 0.95 * min(random_starts)
    assert ours <= inertia(x, kmeans_assignments(x, 40, seed=0, restarts=1))  # best of three <= its first


def test_clustering_metrics_use_as_many_clusters_as_classes():
    rng = np.random.default_rng(8)
    labels = rng.integers(0, 30, size=600)
    x = clustered(rng, labels, 16)
    got = clustering_metrics(x, labels, seed=4)
    assert got == clustering_scores(labels, kmeans_assignments(x, 30, seed=4))
    assert got != clustering_scores(labels, kmeans_assignments(x, 29, seed=4))
    assert got["ami"] > 0.5  # the clusters follow the classes


def flat_images(x: np.ndarray, labels: np.ndarray) -> TensorImages:
    """Embeddings as 1 x 1 x D images, so that torch.nn.Flatten is a model that returns them unchanged."""
    return TensorImages(torch.from_numpy(x)[:, None, None, :], labels)


def test_evaluate_split_clusters_test_splits_only():
    rng = np.random.default_rng(9)
    labels = rng.integers(0, 12, size=200)
    x = clustered(rng, labels, 8)
    model, config, cpu = torch.nn.Flatten(), EvalConfig(), torch.device("cpu")
    expected = {**retrieval_metrics(x, labels), **clustering_metrics(x, labels)}
    got = evaluate_split(model, EvalSplit("test_small", flat_images(x, labels)), config, cpu)
    assert got == pytest.approx({f"test_small/{k}": v for k, v in expected.items()}, abs=1e-12)
    val = evaluate_split(model, EvalSplit("val", flat_images(x, labels)), config, cpu)
    assert set(val) == {f"val/{k}" for k in retrieval_metrics(x, labels)}
    # query -> gallery: the query set is what is clustered
    split = EvalSplit("test", flat_images(x[:80], labels[:80]), flat_images(x[80:], labels[80:]))
    got = evaluate_split(model, split, config, cpu)
    for key, value in clustering_metrics(x[:80], labels[:80]).items():
        assert got[f"test/{key}"] == pytest.approx(value, abs=1e-12)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda: clustering_metrics(np.full((4, 2), np.nan), [0, 0, 1, 1]),
            ValueError,
            "embeddings: contains",
        ),
        (lambda: clustering_metrics(np.zeros((4, 2)), [0, 1]), ValueError, "labels: expected 4 labels"),
        (lambda: clustering_scores([0, 1, 1], [0, 1]), ValueError, "clusters: expected 3 labels"),
        (lambda: kmeans_assignments(np.zeros((4, 2)), 5), ValueError, "n_clusters: expected 1..4"),
    ],
)
def test_clustering_bad_input_names_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()
