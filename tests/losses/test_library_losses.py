"""Triplet, contrastive and multi-similarity, built through the registry, against their formulas written out
here in float64 with plain loops: the miner's selection rule, the per-term loss and pytorch-metric-learning
2.9.0's reduction (mean of the non-zero terms for triplet and for each half of contrastive, mean over every
anchor of the batch for multi-similarity). Then each constructor parameter is shown to change the value."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np
import optuna
import pytest
import torch

from losses import get_loss, get_spec

SEEDS = (0, 1, 2)
TIE_TOLERANCE = 1e-9  # no mining decision may sit this close to its threshold, or the comparison is ill-posed


def unit_batch(seed: int, class_sizes=(4, 3, 3, 2, 1), dim: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled uneven classes (one singleton: an anchor without positives) with non-contiguous ids; unit
    vectors scattered around one random centre per class, so distances span the margins tested."""
    rng = np.random.default_rng(seed)
    ids = np.arange(len(class_sizes)) * 7 + 3
    members = rng.permutation(np.repeat(np.arange(len(class_sizes)), class_sizes))
    centres = rng.standard_normal((len(class_sizes), dim))
    points = centres[members] + rng.standard_normal((len(members), dim))
    return points / np.linalg.norm(points, axis=1, keepdims=True), ids[members]


def registry_value(name: str, emb: np.ndarray, labels: np.ndarray, **params) -> float:
    loss = get_loss(name, **params)
    return float(loss(torch.from_numpy(emb), torch.from_numpy(labels)))


def euclidean(emb: np.ndarray) -> np.ndarray:
    return np.sqrt(((emb[:, None, :] - emb[None, :, :]) ** 2).sum(axis=-1))


def mean_of_positive(terms: list[float]) -> float:
    """Hinge then PML's AvgNonZeroReducer: the mean of the terms above 0, or 0 when there are none."""
    positive = [t for t in terms if t > 0]
    return sum(positive) / len(positive) if positive else 0.0


def positives_and_negatives(labels: np.ndarray, anchor: int) -> tuple[list[int], list[int]]:
    same = [j for j in range(len(labels)) if j != anchor and labels[j] == labels[anchor]]
    other = [j for j in range(len(labels)) if labels[j] != labels[anchor]]
    return same, other


def assert_away_from(values: list[float], thresholds: list[float]) -> None:
    for threshold in thresholds:
        assert min(abs(v - threshold) for v in values) > TIE_TOLERANCE, "batch has a near-tie: pick another"


# gap = d(anchor, negative) - d(anchor, positive): how far the negative lies beyond the positive
TRIPLET_SELECTION: dict[str, Callable[[float, float], bool]] = {
    "all": lambda gap, margin: gap <= margin,  # every triplet violating the margin
    "hard": lambda gap, margin: gap <= margin and gap <= 0,  # ... whose negative is nearer than the positive
    "semihard": lambda gap, margin: 0 < gap <= margin,  # ... whose negative is farther than the positive
    "easy": lambda gap, margin: gap > margin,  # every triplet not violating it
}
TRIPLET_MINERS = (*TRIPLET_SELECTION, "batch_hard")


def triplet_formula(emb: np.ndarray, labels: np.ndarray, margin: float, miner: str) -> float:
    """Mean over the selected triplets with a non-zero hinge of [d(a,p) - d(a,n) + margin]_+; batch_hard
    selects one triplet per anchor: its farthest positive and its nearest negative."""
    d = euclidean(emb)
    terms, gaps = [], []
    for anchor in range(len(labels)):
        positives, negatives = positives_and_negatives(labels, anchor)
        if miner == "batch_hard":
            if positives and negatives:
                terms.append(max(d[anchor, positives]) - min(d[anchor, negatives]) + margin)
            continue
        for positive, negative in itertools.product(positives, negatives):
            gap = d[anchor, negative] - d[anchor, positive]
            gaps.append(gap)
            if TRIPLET_SELECTION[miner](gap, margin):
                terms.append(d[anchor, positive] - d[anchor, negative] + margin)
    if miner == "batch_hard":
        assert_away_from(terms, [0.0])
    else:
        assert_away_from(gaps, [0.0, margin])
    return mean_of_positive(terms)


def contrastive_formula(emb: np.ndarray, labels: np.ndarray, pos_margin: float, neg_margin: float) -> float:
    """Over all ordered pairs i != j: mean of the non-zero [d - pos_margin]_+ of positive pairs plus mean of
    the non-zero [neg_margin - d]_+ of negative pairs."""
    d = euclidean(emb)
    pos_terms, neg_terms = [], []
    for i, j in itertools.permutations(range(len(labels)), 2):
        if labels[i] == labels[j]:
            pos_terms.append(d[i, j] - pos_margin)
        else:
            neg_terms.append(neg_margin - d[i, j])
    assert_away_from(pos_terms + neg_terms, [0.0])
    return mean_of_positive(pos_terms) + mean_of_positive(neg_terms)


def multi_similarity_formula(
    emb: np.ndarray, labels: np.ndarray, alpha: float, beta: float, base: float, epsilon: float
) -> float:
    """Wang et al. 2019 on cosine similarities S, averaged over every anchor of the batch. The miner keeps a
    positive when S - epsilon < the anchor's largest negative S, a negative when S + epsilon > its smallest
    positive S; an anchor without positives keeps nothing and contributes 0."""
    s = emb @ emb.T
    per_anchor, decisions = [], []
    for anchor in range(len(labels)):
        positives, negatives = positives_and_negatives(labels, anchor)
        kept_pos, kept_neg = [], []
        if positives and negatives:
            hardest_neg, hardest_pos = max(s[anchor, negatives]), min(s[anchor, positives])
            kept_pos = [j for j in positives if s[anchor, j] - epsilon < hardest_neg]
            kept_neg = [k for k in negatives if s[anchor, k] + epsilon > hardest_pos]
            decisions += [s[anchor, j] - epsilon - hardest_neg for j in positives]
            decisions += [s[anchor, k] + epsilon - hardest_pos for k in negatives]
        pull = math.log1p(sum(math.exp(-alpha * (s[anchor, j] - base)) for j in kept_pos)) / alpha
        push = math.log1p(sum(math.exp(beta * (s[anchor, k] - base)) for k in kept_neg)) / beta
        per_anchor.append(pull + push)
    assert_away_from(decisions, [0.0])
    return sum(per_anchor) / len(per_anchor)


FORMULAS = {
    "triplet": triplet_formula,
    "contrastive": contrastive_formula,
    "multi_similarity": multi_similarity_formula,
}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("miner", TRIPLET_MINERS)
@pytest.mark.parametrize("margin", [0.05, 0.2, 0.5])
def test_triplet_equals_its_formula(margin, miner, seed):
    emb, labels = unit_batch(seed)
    expected = triplet_formula(emb, labels, margin, miner)
    if miner != "easy":  # an easy triplet never violates the margin: that loss is 0 by construction
        assert expected > 0, "the selection must keep some violating triplet, or the check is vacuous"
    got = registry_value("triplet", emb, labels, margin=margin, miner=miner)
    assert got == pytest.approx(expected, abs=1e-10, rel=0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("pos_margin, neg_margin", [(0.0, 1.0), (0.3, 0.9), (0.5, 1.6), (0.45, 0.6)])
def test_contrastive_equals_its_formula(pos_margin, neg_margin, seed):
    emb, labels = unit_batch(seed)
    expected = contrastive_formula(emb, labels, pos_margin, neg_margin)
    got = registry_value("contrastive", emb, labels, pos_margin=pos_margin, neg_margin=neg_margin)
    assert got == pytest.approx(expected, abs=1e-10, rel=0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "alpha, beta, base, epsilon",
    [(2.0, 50.0, 0.5, 0.1), (0.5, 10.0, 0.0, 0.3), (10.0, 80.0, 1.0, 0.01), (4.0, 20.0, 0.7, 0.05)],
)
def test_multi_similarity_equals_its_formula(alpha, beta, base, epsilon, seed):
    emb, labels = unit_batch(seed)
    expected = multi_similarity_formula(emb, labels, alpha, beta, base, epsilon)
    got = registry_value("multi_similarity", emb, labels, alpha=alpha, beta=beta, base=base, epsilon=epsilon)
    assert got == pytest.approx(expected, abs=1e-10, rel=0)


DOCUMENTED_DEFAULTS = {  # README and each module's docstring
    "triplet": {"margin": 0.1, "miner": "semihard"},
    "contrastive": {"pos_margin": 0.0, "neg_margin": 1.0},
    "multi_similarity": {"alpha": 2.0, "beta": 50.0, "base": 0.5, "epsilon": 0.1},
}


@pytest.mark.parametrize("name", sorted(DOCUMENTED_DEFAULTS))
def test_defaults_are_the_documented_ones(name):
    emb, labels = unit_batch(0)
    expected = FORMULAS[name](emb, labels, **DOCUMENTED_DEFAULTS[name])
    assert registry_value(name, emb, labels) == pytest.approx(expected, abs=1e-10, rel=0)


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_points_the_tuner_samples_equal_the_formula(name):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=7))
    emb, labels = unit_batch(1)
    for _ in range(5):
        params = get_spec(name).search_space(study.ask())
        got = registry_value(name, emb, labels, **params)
        assert got == pytest.approx(FORMULAS[name](emb, labels, **params), abs=1e-10, rel=0), params


# (loss, the other parameters held fixed, the parameter changed, its two values)
CHANGES = [
    ("triplet", {"miner": "all"}, "margin", 0.1, 0.3),
    ("triplet", {"miner": "semihard"}, "margin", 0.1, 0.3),
    ("triplet", {"miner": "batch_hard"}, "margin", 0.1, 0.3),
    ("triplet", {"margin": 0.2}, "miner", "semihard", "hard"),
    ("triplet", {"margin": 0.2}, "miner", "all", "batch_hard"),
    ("triplet", {"margin": 0.2}, "miner", "hard", "easy"),
    ("contrastive", {"neg_margin": 1.0}, "pos_margin", 0.0, 0.4),
    ("contrastive", {"pos_margin": 0.0}, "neg_margin", 0.8, 1.4),
    ("multi_similarity", {"beta": 50.0, "base": 0.5, "epsilon": 0.1}, "alpha", 1.0, 5.0),
    ("multi_similarity", {"alpha": 2.0, "base": 0.5, "epsilon": 0.1}, "beta", 20.0, 60.0),
    ("multi_similarity", {"alpha": 2.0, "beta": 50.0, "epsilon": 0.1}, "base", 0.3, 0.7),
    ("multi_similarity", {"alpha": 2.0, "beta": 50.0, "base": 0.5}, "epsilon", 0.02, 0.3),
]


def change_id(change: tuple) -> str:
    name, fixed, param, first, second = change
    return f"{name}-{param}-{first}-vs-{second}-" + "-".join(f"{k}={v}" for k, v in fixed.items())


@pytest.mark.parametrize("name, fixed, param, first, second", CHANGES, ids=list(map(change_id, CHANGES)))
def test_each_parameter_changes_the_value(name, fixed, param, first, second):
    emb, labels = unit_batch(0)
    values = []
    for value in (first, second):
        params = {**fixed, param: value}
        got = registry_value(name, emb, labels, **params)
        assert got == pytest.approx(FORMULAS[name](emb, labels, **params), abs=1e-10, rel=0)
        values.append(got)
    assert abs(values[0] - values[1]) > 1e-3, f"{name}: {param}={first} and {second} give the same loss"
