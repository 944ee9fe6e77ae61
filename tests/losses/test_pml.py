"""The pytorch-metric-learning wrappers against brute-force float64 references written from each loss's
definition (PML's conventions: ordered pairs, Euclidean distances of unit vectors, averages over the non-zero
terms), both through `forward` and through `forward_similarities` (the PMLLoss base's distance swap)."""

import math

import pytest
import torch

from losses import get_loss


def batch() -> tuple[torch.Tensor, list[int]]:
    """Uneven, shuffled classes, and class 3 a singleton (an anchor with no positive)."""
    gen = torch.Generator().manual_seed(3)
    labels = [0, 1, 0, 2, 1, 0, 2, 1, 3, 0, 2]
    emb = torch.randn(len(labels), 4, generator=gen, dtype=torch.float64)
    return torch.nn.functional.normalize(emb, dim=1), labels


def mean_of_nonzero(values: list[float]) -> float:
    nonzero = [v for v in values if v > 0]
    return sum(nonzero) / len(nonzero) if nonzero else 0.0


def triplet_reference(emb: list[list[float]], labels: list[int], margin: float, miner: str) -> float:
    size = len(labels)

    def dist(i, j):
        return math.dist(emb[i], emb[j])

    def positives(a):
        return [p for p in range(size) if p != a and labels[p] == labels[a]]

    def negatives(a):
        return [n for n in range(size) if labels[n] != labels[a]]

    if miner == "batch_hard":  # the farthest positive and the nearest negative of each anchor
        triplets = [
            (a, max(positives(a), key=lambda p: dist(a, p)), min(negatives(a), key=lambda n: dist(a, n)))
            for a in range(size)
            if positives(a) and negatives(a)
        ]
    else:  # m = d(a, n) - d(a, p): "all" violates the margin, "hard" m <= 0, "semihard" m > 0, "easy" rest
        keep = {
            "all": lambda m: m <= margin,
            "hard": lambda m: m <= 0,
            "semihard": lambda m: 0 < m <= margin,
            "easy": lambda m: m > margin,
        }[miner]
        triplets = [
            (a, p, n)
            for a in range(size)
            for p in positives(a)
            for n in negatives(a)
            if keep(dist(a, n) - dist(a, p))
        ]
    return mean_of_nonzero([max(0.0, dist(a, p) - dist(a, n) + margin) for a, p, n in triplets])


def contrastive_reference(emb, labels, pos_margin: float, neg_margin: float) -> float:
    size = len(labels)
    pos, neg = [], []
    for i in range(size):
        for j in range(size):
            if i != j and labels[i] == labels[j]:
                pos.append(max(0.0, math.dist(emb[i], emb[j]) - pos_margin))
            elif labels[i] != labels[j]:
                neg.append(max(0.0, neg_margin - math.dist(emb[i], emb[j])))
    return mean_of_nonzero(pos) + mean_of_nonzero(neg)


def multi_similarity_reference(emb, labels, alpha: float, beta: float, base: float, epsilon: float) -> float:
    """Mean over every anchor of the MS loss on the pairs the MS miner keeps: positives less similar than
    the most similar negative plus epsilon, negatives more similar than the least similar positive minus
    epsilon."""
    size = len(labels)
    total = 0.0
    for a in range(size):
        sim = [sum(x * y for x, y in zip(emb[a], emb[j], strict=True)) for j in range(size)]
        pos = [sim[p] for p in range(size) if p != a and labels[p] == labels[a]]
        neg = [sim[n] for n in range(size) if labels[n] != labels[a]]
        if not pos or not neg:
            continue
        kept_pos = [s for s in pos if s - epsilon < max(neg)]
        kept_neg = [s for s in neg if s + epsilon > min(pos)]
        if kept_pos:
            total += math.log(1 + sum(math.exp(-alpha * (s - base)) for s in kept_pos)) / alpha
        if kept_neg:
            total += math.log(1 + sum(math.exp(beta * (s - base)) for s in kept_neg)) / beta
    return total / size


def fastap_reference(emb, labels, num_bins: int) -> float:
    """1 - FastAP (Cakir et al.): squared distances in [0, 4] soft-binned with triangular pulses of width
    4 / num_bins around num_bins + 1 centres; AP_q = sum_l h+_l H+_l / H_l / |P_q|, H cumulative counts."""
    size, delta = len(labels), 4.0 / num_bins
    centres = [k * delta for k in range(num_bins + 1)]
    per_query = []
    for q in range(size):
        pos_count = sum(1 for j in range(size) if j != q and labels[j] == labels[q])
        if pos_count == 0:
            continue
        pos_hist, all_hist = [0.0] * len(centres), [0.0] * len(centres)
        for j in range(size):
            if j == q:
                continue
            d2 = math.dist(emb[q], emb[j]) ** 2
            for k, centre in enumerate(centres):
                pulse = max(0.0, 1 - abs(d2 - centre) / delta)
                all_hist[k] += pulse
                pos_hist[k] += pulse if labels[j] == labels[q] else 0.0
        ap, cum_pos, cum_all = 0.0, 0.0, 0.0
        for h_pos, h_all in zip(pos_hist, all_hist, strict=True):
            cum_pos, cum_all = cum_pos + h_pos, cum_all + h_all
            if h_pos * cum_pos > 0:
                ap += h_pos * cum_pos / cum_all
        per_query.append(1 - ap / pos_count)
    return sum(per_query) / len(per_query)


CASES = [
    *[
        ("triplet", {"margin": 0.3, "miner": miner}, triplet_reference)
        for miner in ("all", "hard", "semihard", "easy", "batch_hard")
    ],
    ("triplet", {"margin": 0.1, "miner": "semihard"}, triplet_reference),
    ("contrastive", {"pos_margin": 0.0, "neg_margin": 1.0}, contrastive_reference),
    ("contrastive", {"pos_margin": 0.3, "neg_margin": 1.4}, contrastive_reference),
    (
        "multi_similarity",
        {"alpha": 2.0, "beta": 50.0, "base": 0.5, "epsilon": 0.1},
        multi_similarity_reference,
    ),
    (
        "multi_similarity",
        {"alpha": 5.0, "beta": 10.0, "base": 0.2, "epsilon": 0.3},
        multi_similarity_reference,
    ),
    ("fastap", {"num_bins": 10}, fastap_reference),
    ("fastap", {"num_bins": 4}, fastap_reference),
]


def case_id(name: str, params: dict, reference) -> str:
    return name + "".join(f"-{key}={value}" for key, value in params.items())


@pytest.mark.parametrize(("name", "params", "reference"), CASES, ids=[case_id(*case) for case in CASES])
def test_matches_brute_force(name, params, reference):
    emb, labels = batch()
    expected = reference(emb.tolist(), labels, **params)
    loss = get_loss(name, **params)
    labels_tensor = torch.tensor(labels)
    assert loss(emb, labels_tensor).item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    by_sims = loss.forward_similarities(emb @ emb.T, labels_tensor)
    assert by_sims.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_cases_are_not_degenerate():
    """The references must see mined triplets and non-zero losses, or the comparisons above prove little."""
    emb, labels = batch()
    for name, params, reference in CASES:
        value = reference(emb.tolist(), labels, **params)
        easy = params.get("miner") == "easy"  # easy triplets never violate the margin
        assert value == 0 if easy else value > 0, (name, params)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        (
            "triplet",
            {"miner": "hardest"},
            "triplet: miner must be one of all, hard, semihard, easy, batch_hard",
        ),
        (
            "contrastive",
            {"pos_margin": 0.5, "neg_margin": 0.5},
            "contrastive: need 0 <= pos_margin < neg_margin",
        ),
        ("contrastive", {"pos_margin": -0.1}, r"contrastive: need .* got -0.1, 1.0"),
        ("fastap", {"num_bins": 1}, "fastap: num_bins must be >= 2, got 1"),
    ],
    ids=["triplet-miner", "contrastive-equal-margins", "contrastive-negative-pos_margin", "fastap-num_bins"],
)
def test_bad_parameters_name_the_loss_and_value(name, params, message):
    with pytest.raises(ValueError, match=message):
        get_loss(name, **params)
