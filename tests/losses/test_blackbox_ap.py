"""Blackbox AP: exact 1 - mAP forward, and the blackbox-differentiation backward worked by hand."""

import torch

from losses.blackbox_ap import BlackboxAP, BlackboxRank, blackbox_ap_loss_from_similarities


def brute_force_map(sims: torch.Tensor, labels: torch.Tensor) -> float:
    """mAP over queries with a positive: mean over positives of precision at the positive's position."""
    batch = labels.numel()
    aps = []
    for q in range(batch):
        items = sorted((j for j in range(batch) if j != q), key=lambda j: -float(sims[q, j]))
        hits, precisions = 0, []
        for position, j in enumerate(items, start=1):
            if labels[j] == labels[q]:
                hits += 1
                precisions.append(hits / position)
        if precisions:
            aps.append(sum(precisions) / len(precisions))
    return sum(aps) / len(aps)


def test_forward_is_one_minus_exact_map():
    gen = torch.Generator().manual_seed(0)
    labels = torch.repeat_interleave(torch.arange(5), torch.tensor([1, 3, 4, 2, 5]))
    labels = labels[torch.randperm(labels.numel(), generator=gen)]
    emb = torch.nn.functional.normalize(
        torch.randn(labels.numel(), 4, generator=gen, dtype=torch.float64), dim=1
    )
    value = BlackboxAP(lambda_val=1.0, margin=0.0)(emb, labels)
    assert abs(value.item() - (1.0 - brute_force_map(emb @ emb.T, labels))) < 1e-12


def test_margin_ranks_shifted_scores():
    """With a margin, positives are lowered and negatives raised before ranking."""
    sims = torch.tensor([[1.0, 0.50, 0.46], [0.50, 1.0, 0.2], [0.46, 0.2, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    # query 0: positive 0.50 vs negative 0.46 -> rank 1 without margin, rank 2 with margin 0.05
    assert blackbox_ap_loss_from_similarities(sims, labels, 1.0, 0.0).item() == 0.0
    assert abs(blackbox_ap_loss_from_similarities(sims, labels, 1.0, 0.05).item() - 0.25) < 1e-15


def test_rank_backward_on_hand_example():
    """scores (0.9, 0.8, 0.1), ranks (1, 2, 3); dL/drank = (0, 0.25, 0), lambda 1: perturbed scores
    (0.9, 1.05, 0.1) rank (2, 1, 3), so dL/ds = (rank' - rank) / lambda = (1, -1, 0)."""
    scores = torch.tensor([[0.9, 0.8, 0.1]], dtype=torch.float64, requires_grad=True)
    ranks = BlackboxRank.apply(scores, 1.0)
    assert ranks.tolist() == [[1.0, 2.0, 3.0]]
    ranks.backward(torch.tensor([[0.0, 0.25, 0.0]], dtype=torch.float64))
    assert scores.grad.tolist() == [[1.0, -1.0, 0.0]]


def test_loss_backward_on_hand_example():
    """Labels (0, 0, 1); s01 = 0.5, s02 = 0.7, s12 = 0.2; query 2 has no positive.
    Query 0 ranks item 2 first, its positive second: AP 1/2. Query 1: AP 1. Loss 1 - 3/4 = 1/4.
    dL/drank_all at query 0's positive = (1/2 queries) * rank_pos / rank_all^2 = 1/8; effective lambda
    = lambda * 2 queries = 2, so the positive's score becomes 0.5 + 2/8 = 0.75 > 0.7 and the two items swap:
    dL/ds01 = (1 - 2)/2 = -1/2, dL/ds02 = (2 - 1)/2 = 1/2. Query 1's positive is already first: no gradient.
    Ranks among positives alone never change here (one positive per query)."""
    sims = torch.tensor(
        [[1.0, 0.5, 0.7], [0.5, 1.0, 0.2], [0.7, 0.2, 1.0]], dtype=torch.float64, requires_grad=True
    )
    labels = torch.tensor([0, 0, 1])
    value = blackbox_ap_loss_from_similarities(sims, labels, lambda_val=1.0, margin=0.0)
    assert abs(value.item() - 0.25) < 1e-15
    value.backward()
    expected = torch.tensor([[0.0, -0.5, 0.5], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    assert torch.equal(sims.grad, expected)
