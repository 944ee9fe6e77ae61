"""FastAP (a pytorch-metric-learning wrapper) against a brute-force float64 reference written from its
definition, through `forward` and `forward_similarities` (the PMLLoss base's distance swap); and the wrappers'
parameter errors. Triplet, contrastive and multi-similarity have their formulas in test_library_losses.py."""

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


CASES = [("fastap", {"num_bins": 10}, fastap_reference), ("fastap", {"num_bins": 4}, fastap_reference)]


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
    """The reference must give a non-zero loss, or the comparison above proves little."""
    emb, labels = batch()
    for name, params, reference in CASES:
        value = reference(emb.tolist(), labels, **params)
        assert value > 0, (name, params)


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
