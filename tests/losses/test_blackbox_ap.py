"""Blackbox AP: the authors' algorithm against a loop implementation written from its description (exact ranks
forward; the blackbox gradient through the rank among all items only, on normalised ranks; the stochastic
margin; the interclass term and the batch memory), and our earlier `both_ranks` variant by hand."""

import math

import pytest
import torch

from losses.blackbox_ap import (
    BlackboxAP,
    BlackboxRank,
    authors_ap_loss,
    both_ranks_loss_from_similarities,
    margin_shifts,
)


def uneven_batch(seed: int, counts: tuple[int, ...] = (1, 3, 4, 2, 5), dim: int = 4):
    """Shuffled classes of uneven sizes (a singleton among them: an item that is never a query)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    labels = labels[torch.randperm(labels.numel(), generator=gen)]
    emb = torch.randn(labels.numel(), dim, generator=gen, dtype=torch.float64)
    return torch.nn.functional.normalize(emb, dim=1), labels


# ---- the reference: loops over Python floats, written from the description of the algorithm ----


def ranks_by_counting(scores: list[float]) -> list[int]:
    """1 + the number of items scored higher; of two equal scores the earlier item ranks first."""
    return [
        1 + sum(1 for k, other in enumerate(scores) if other > s or (other == s and k < j))
        for j, s in enumerate(scores)
    ]


def reference_ranking(scores: list[float], positive: list[bool], weight: float, lambda_val: float):
    """One ranking of N items that enters the loss as -weight * AP. Returns AP and dL/ds per item.

    rho = rank / N; AP = 1/|P| sum_{i in P} prank(i) / rank(i) with prank(i) the rank among the positives, a
    constant; dL/drho_i = weight/|P| * (prank_i / N) / rho_i^2 on positives; s' = s + lambda * dL/drho;
    dL/ds = (rho(s') - rho(s)) / lambda.
    """
    n = len(scores)
    rho = [r / n for r in ranks_by_counting(scores)]
    pos_items = [j for j in range(n) if positive[j]]
    pos_ranks = ranks_by_counting([scores[j] for j in pos_items])
    prank = {j: pos_ranks[k] / n for k, j in enumerate(pos_items)}
    ap = sum(prank[j] / rho[j] for j in pos_items) / len(pos_items)
    grad_rho = [weight / len(pos_items) * prank[j] / rho[j] ** 2 if positive[j] else 0.0 for j in range(n)]
    perturbed = [s + lambda_val * g for s, g in zip(scores, grad_rho, strict=True)]
    rho_perturbed = [r / n for r in ranks_by_counting(perturbed)]
    return ap, [(rp - r) / lambda_val for rp, r in zip(rho_perturbed, rho, strict=True)]


def reference_loss(sims, labels, item_labels, lambda_val: float, interclass_coef: float = 0.0):
    """Loss and dL/dS for the B x M similarities of B queries to M items (the queries, then memory items).

    Query q ranks every item but itself and counts when it has a positive; the loss is (1 - beta)(1 - mean AP)
    plus, with beta > 0, beta (1 - AP) of one ranking of every (query, other query) pair.
    """
    sims, labels, item_labels = sims.tolist(), labels.tolist(), item_labels.tolist()
    batch, size = len(labels), len(item_labels)
    grad = [[0.0] * size for _ in range(batch)]
    queries = [q for q in range(batch) if any(item_labels[j] == labels[q] for j in range(size) if j != q)]
    loss = 1.0 - interclass_coef
    for q in queries:
        items = [j for j in range(size) if j != q]
        ap, row_grad = reference_ranking(
            [sims[q][j] for j in items],
            [item_labels[j] == labels[q] for j in items],
            (1.0 - interclass_coef) / len(queries),
            lambda_val,
        )
        loss -= (1.0 - interclass_coef) * ap / len(queries)
        for j, g in zip(items, row_grad, strict=True):
            grad[q][j] += g
    if interclass_coef > 0:
        pairs = [(q, j) for q in range(batch) for j in range(batch) if j != q]
        ap, pair_grad = reference_ranking(
            [sims[q][j] for q, j in pairs],
            [labels[q] == labels[j] for q, j in pairs],
            interclass_coef,
            lambda_val,
        )
        loss += interclass_coef * (1.0 - ap)
        for (q, j), g in zip(pairs, pair_grad, strict=True):
            grad[q][j] += g
    return loss, torch.tensor(grad, dtype=torch.float64)


# ---- the authors' variant ----


@pytest.mark.parametrize("lambda_val", [1.0, 4.0, 30.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_authors_loss_and_gradient_equal_the_reference(seed, lambda_val):
    emb, labels = uneven_batch(seed)
    loss = BlackboxAP(lambda_val=lambda_val, margin=0.0)
    sims = (emb @ emb.T).requires_grad_(True)
    value = loss.forward_similarities(sims, labels)
    value.backward()
    expected, expected_grad = reference_loss(emb @ emb.T, labels, labels, lambda_val)
    assert abs(value.item() - expected) < 1e-12
    assert (expected_grad != 0).sum() >= 4, (
        "the perturbation must move items, or the comparison proves little"
    )
    torch.testing.assert_close(sims.grad, expected_grad, rtol=0, atol=1e-12)
    # through the embeddings: dL/dE = (G + G^T) E
    leaf = emb.clone().requires_grad_(True)
    loss(leaf, labels).backward()
    torch.testing.assert_close(leaf.grad, (expected_grad + expected_grad.T) @ emb, rtol=0, atol=1e-12)


@pytest.mark.parametrize("interclass_coef", [0.3, 1.0])
def test_interclass_term_equals_the_reference(interclass_coef):
    emb, labels = uneven_batch(2, counts=(2, 2, 6, 1, 3, 1))
    sims = (emb @ emb.T).requires_grad_(True)
    value = BlackboxAP(lambda_val=2.0, margin=0.0, interclass_coef=interclass_coef).forward_similarities(
        sims, labels
    )
    value.backward()
    expected, expected_grad = reference_loss(emb @ emb.T, labels, labels, 2.0, interclass_coef)
    assert abs(value.item() - expected) < 1e-12
    torch.testing.assert_close(sims.grad, expected_grad, rtol=0, atol=1e-12)


def test_batch_memory_ranks_against_the_last_batches_and_sends_them_no_gradient():
    """Memory of 2: each batch's queries rank the batch and the two previous batches (newest first); the
    remembered embeddings are constants."""
    loss = BlackboxAP(lambda_val=3.0, margin=0.0, batch_memory=2)
    batches = [uneven_batch(seed, counts=(2, 3, 1, 2)) for seed in range(4)]
    leaves = [emb.clone().requires_grad_(True) for emb, _ in batches]
    for step, ((emb, labels), leaf) in enumerate(zip(batches, leaves, strict=True)):
        earlier_grads = [previous.grad.clone() for previous in leaves[:step]]
        value = loss(leaf, labels)
        value.backward()
        remembered = batches[max(0, step - 2) : step][::-1]
        items = torch.cat([emb, *(e for e, _ in remembered)])
        item_labels = torch.cat([labels, *(lab for _, lab in remembered)])
        expected, grad = reference_loss(emb @ items.T, labels, item_labels, 3.0)
        assert abs(value.item() - expected) < 1e-12
        batch = labels.numel()
        torch.testing.assert_close(leaf.grad, grad @ items + grad[:, :batch].T @ emb, rtol=0, atol=1e-12)
        for previous, before in zip(leaves[:step], earlier_grads, strict=True):
            assert torch.equal(previous.grad, before)


def test_batch_memory_is_kept_in_the_state_dict():
    """A run resumed from a checkpoint continues with the memory it had."""
    batches = [uneven_batch(seed, counts=(2, 3, 1, 2)) for seed in range(3)]
    trained = BlackboxAP(margin=0.0, batch_memory=2)
    for emb, labels in batches[:2]:
        trained(emb, labels)
    resumed = BlackboxAP(margin=0.0, batch_memory=2)
    resumed.load_state_dict(trained.state_dict())
    emb, labels = batches[2]
    grads = []
    for loss in (trained, resumed):
        leaf = emb.clone().requires_grad_(True)
        loss(leaf, labels).backward()
        grads.append(leaf.grad)
    leaf = emb.clone().requires_grad_(True)
    BlackboxAP(margin=0.0, batch_memory=2)(leaf, labels).backward()  # an empty memory
    assert torch.equal(grads[0], grads[1]) and not torch.equal(grads[0], leaf.grad)


def test_stochastic_margin_repeats_with_the_seed_and_changes_with_it():
    emb, labels = uneven_batch(3, counts=(4, 4, 4, 4, 4, 4))
    loss = BlackboxAP(lambda_val=4.0, margin=0.3)

    def run(seed: int):
        torch.manual_seed(seed)
        leaf = emb.clone().requires_grad_(True)
        value = loss(leaf, labels)
        value.backward()
        return value.detach(), leaf.grad

    first, again = run(7), run(7)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    others = [run(seed)[0] for seed in range(8, 12)]
    assert any(not torch.equal(first[0], other) for other in others), "the margin draws must differ by seed"


def test_margin_shifts_are_half_normal_times_margin_over_two():
    """Positives lowered, negatives raised, each by margin * |z| / 2: mean margin * sqrt(2 / pi) / 2, standard
    deviation margin / 2 * sqrt(1 - 2 / pi), and the half-normal distribution (Kolmogorov-Smirnov)."""
    margin = 0.3
    torch.manual_seed(0)
    positive = torch.rand(300, 300) < 0.25
    shifts = margin_shifts(positive, margin, torch.float64)
    assert (shifts[positive] <= 0).all() and (shifts[~positive] >= 0).all()
    for size in (shifts[positive].abs(), shifts[~positive]):
        n = size.numel()
        mean, std = margin * math.sqrt(2 / math.pi) / 2, margin / 2 * math.sqrt(1 - 2 / math.pi)
        assert abs(size.mean().item() - mean) < 5 * std / math.sqrt(n)
        assert abs(size.std().item() - std) < 0.025 * std
        cdf = torch.erf(size.sort().values / (margin / 2) / math.sqrt(2))
        empirical = torch.arange(1, n + 1, dtype=torch.float64) / n
        assert (cdf - empirical).abs().max().item() < 1.63 / math.sqrt(n)  # KS at the 1% level


def test_margin_enters_the_ranking_as_drawn():
    """One positive at 0, one negative at -d: the positive stays first iff m|z1|/2 + m|z2|/2 < d, which has
    probability erf(d / m)^2 (|z1| + |z2| = sqrt(2) max(|u|, |v|) for independent normal u, v); a row's AP
    is 1 or 1/2, so the mean loss over many rows is (1 - erf(d / m)^2) / 2."""
    margin, gap, rows = 0.3, 0.22, 20000
    scores = torch.tensor([[0.0, -gap]], dtype=torch.float64).repeat(rows, 1)
    positive = torch.tensor([[True, False]]).repeat(rows, 1)
    torch.manual_seed(1)
    value = authors_ap_loss(scores, positive, 2, 1.0, margin).item()
    second = 1 - math.erf(gap / margin) ** 2
    assert abs(value - second / 2) < 4 * math.sqrt(second * (1 - second) / rows) / 2


# ---- behaviour shared by both variants, and our both_ranks variant ----


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


@pytest.mark.parametrize("variant", ["authors", "both_ranks"])
def test_forward_is_one_minus_exact_map(variant):
    emb, labels = uneven_batch(0)
    value = BlackboxAP(lambda_val=1.0, margin=0.0, variant=variant)(emb, labels)
    assert abs(value.item() - (1.0 - brute_force_map(emb @ emb.T, labels))) < 1e-12


def test_margin_ranks_shifted_scores():
    """With a margin, positives are lowered and negatives raised before ranking."""
    sims = torch.tensor([[1.0, 0.50, 0.46], [0.50, 1.0, 0.2], [0.46, 0.2, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    # query 0: positive 0.50 vs negative 0.46 -> rank 1 without margin, rank 2 with margin 0.05
    assert both_ranks_loss_from_similarities(sims, labels, 1.0, 0.0).item() == 0.0
    assert abs(both_ranks_loss_from_similarities(sims, labels, 1.0, 0.05).item() - 0.25) < 1e-15


def test_rank_backward_on_hand_example():
    """scores (0.9, 0.8, 0.1), ranks (1, 2, 3); dL/drank = (0, 0.25, 0), lambda 1: perturbed scores
    (0.9, 1.05, 0.1) rank (2, 1, 3), so dL/ds = (rank' - rank) / lambda = (1, -1, 0)."""
    scores = torch.tensor([[0.9, 0.8, 0.1]], dtype=torch.float64, requires_grad=True)
    ranks = BlackboxRank.apply(scores, 1.0)
    assert ranks.tolist() == [[1.0, 2.0, 3.0]]
    ranks.backward(torch.tensor([[0.0, 0.25, 0.0]], dtype=torch.float64))
    assert scores.grad.tolist() == [[1.0, -1.0, 0.0]]


@pytest.mark.parametrize("variant", ["authors", "both_ranks"])
def test_loss_backward_on_hand_example(variant):
    """Labels (0, 0, 1); s01 = 0.5, s02 = 0.7, s12 = 0.2; query 2 has no positive.
    Query 0 ranks item 2 first, its positive second: AP 1/2. Query 1: AP 1. Loss 1 - 3/4 = 1/4.
    both_ranks: dL/drank_all at query 0's positive = (1/2 queries) * rank_pos / rank_all^2 = 1/8; effective
    lambda = lambda * 2 queries = 2, so the positive's score becomes 0.5 + 2/8 = 0.75 > 0.7 and the two items
    swap: dL/ds01 = (1 - 2)/2 = -1/2, dL/ds02 = (2 - 1)/2 = 1/2. authors: N = 2 items, rho = (1/2, 1);
    dL/drho at the positive = 1/2 * (1/2) / 1^2 = 1/4; the score becomes 0.5 + 1/4 = 0.75, the same swap,
    and dL/ds = (rho' - rho) / lambda = -1/2 and 1/2. Query 1's positive is already first: no gradient.
    Ranks among positives alone never change here (one positive per query)."""
    sims = torch.tensor(
        [[1.0, 0.5, 0.7], [0.5, 1.0, 0.2], [0.7, 0.2, 1.0]], dtype=torch.float64, requires_grad=True
    )
    labels = torch.tensor([0, 0, 1])
    value = BlackboxAP(lambda_val=1.0, margin=0.0, variant=variant).forward_similarities(sims, labels)
    assert abs(value.item() - 0.25) < 1e-15
    value.backward()
    expected = torch.tensor([[0.0, -0.5, 0.5], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    assert torch.equal(sims.grad, expected)


def test_no_positive_pair_gives_a_connected_zero_and_warns_once():
    loss = BlackboxAP(batch_memory=1)
    emb = torch.nn.functional.normalize(torch.randn(4, 3, dtype=torch.float64), dim=1).requires_grad_(True)
    with pytest.warns(UserWarning, match="no positive pair"):
        value = loss(emb, torch.arange(4))
    value.backward()
    assert value.item() == 0.0 and torch.equal(emb.grad, torch.zeros_like(emb))


@pytest.mark.parametrize(
    "params, message",
    [
        ({"variant": "mine"}, "variant must be one of authors, both_ranks, got 'mine'"),
        ({"lambda_val": 0.0}, "lambda_val must be > 0, got 0.0"),
        ({"margin": -0.1}, "margin must be >= 0, got -0.1"),
        ({"interclass_coef": 1.5}, r"interclass_coef must be in \[0, 1\], got 1.5"),
        ({"batch_memory": -1}, "batch_memory must be an integer >= 0, got -1"),
        ({"batch_memory": 2.5}, "batch_memory must be an integer >= 0, got 2.5"),
        (
            {"variant": "both_ranks", "batch_memory": 2},
            "variant 'both_ranks' has no interclass.*batch_memory=2",
        ),
    ],
)
def test_bad_parameters_name_the_loss_and_the_value(params, message):
    with pytest.raises(ValueError, match="blackbox_ap: " + message):
        BlackboxAP(**params)
