"""ROADMAP, the Recall@k surrogate and PNP against float64 Python loops written from the authors' formulas
(see each module's docstring): square form and queries x gallery form (a block of queries at an offset, a
memory), values to 1e-12 and gradients to central finite differences of the loops."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_metric_learning import distances
from pytorch_metric_learning import losses as pml_losses

from losses import get_loss
from tests.losses.test_ref_embeddings import extra_items, uneven_batch


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def retrieval(labels, ref_labels, q: int, offset: int, self_positive: bool, self_item: bool):
    """(positives, items) of query q as lists of ref columns; None when it has no other positive."""
    own = offset + q
    positives = [j for j, other in enumerate(ref_labels) if other == labels[q] and j != own]
    if not positives:
        return None
    items = [j for j in range(len(ref_labels)) if j != own or self_item or self_positive]
    return positives + ([own] if self_positive else []), items


def similarities(queries, refs) -> list[list[float]]:
    return (queries.double() @ refs.double().T).tolist()


def roadmap_loop(queries, labels, refs, ref_labels, offset, params) -> float:
    """SupAP + weight * calibration, every sum a Python loop."""
    p = {"temperature": 0.01, "rho": 100.0, "offset": 1.44, "delta": 0.05, "start": 0.5}
    p.update({k: v for k, v in params.items() if k in p})
    weight = params.get("calibration_weight", 1.0)
    include_self = params.get("include_self", True)
    sims, labels, ref_labels = similarities(queries, refs), labels.tolist(), ref_labels.tolist()

    def smooth(t: float) -> float:
        if t <= 0:
            return sigmoid(t / p["temperature"])
        if t <= p["delta"]:
            return p["start"] + sigmoid(t / p["temperature"])
        return p["rho"] * t + p["offset"]

    aps = []
    for q in range(len(labels)):
        found = retrieval(labels, ref_labels, q, offset, include_self, include_self)
        if found is None:
            continue
        positives, items = found
        s = sims[q]
        total = 0.0
        for i in positives:
            rank_pos, rank_all = 1.0, 1.0
            for j in items:
                if j == i:
                    continue
                if j in positives:
                    step = 1.0 if s[j] - s[i] >= 0 else 0.0
                    rank_pos, rank_all = rank_pos + step, rank_all + step
                else:
                    rank_all += smooth(s[j] - s[i])
            total += rank_pos / rank_all
        aps.append(total / len(positives))
    pos, neg = [], []
    for q in range(len(labels)):
        for j in range(len(ref_labels)):
            if j == offset + q:
                continue
            if ref_labels[j] == labels[q]:
                pos.append(max(0.0, params.get("pos_margin", 0.9) - sims[q][j]))
            else:
                neg.append(max(0.0, sims[q][j] - params.get("neg_margin", 0.6)))

    def nonzero_mean(values):
        values = [v for v in values if v > 0]
        return sum(values) / len(values) if values else 0.0

    return 1.0 - sum(aps) / len(aps) + weight * (nonzero_mean(pos) + nonzero_mean(neg))


def recall_at_k_loop(queries, labels, refs, ref_labels, offset, params) -> float:
    temperature = params.get("temperature", 0.01)
    ks = params.get("k_values", (1, 2, 4, 8, 16))
    taus = params.get("k_temperatures", (1.0, 2.0, 4.0, 8.0, 16.0))
    include_self = params.get("include_self", True)
    sims, labels, ref_labels = similarities(queries, refs), labels.tolist(), ref_labels.tolist()
    terms = []
    for q in range(len(labels)):
        found = retrieval(labels, ref_labels, q, offset, False, include_self)
        if found is None:
            continue
        positives, items = found
        s = sims[q]
        ranks = [1.0 + sum(sigmoid((s[j] - s[i]) / temperature) for j in items if j != i) for i in positives]
        recall = 0.0
        for k, tau in zip(ks, taus, strict=True):
            k = min(k, len(ref_labels))
            hits = min(k, sum(sigmoid((k - rank) / tau) for rank in ranks))
            recall += hits / min(k, len(positives))
        terms.append(1.0 - recall / len(ks))
    return sum(terms) / len(terms)


def pnp_loop(queries, labels, refs, ref_labels, offset, params) -> float:
    variant, alpha, b = params.get("variant", "D_q"), params.get("alpha", 4.0), params.get("b", 2.0)
    temperature = params.get("temperature", 0.01)
    include_self = params.get("include_self", True)
    functions = {
        "D_q": lambda r: (1 + r) ** -alpha,
        "O": lambda r: r,
        "D_s": lambda r: math.log(1 + r),
        "I_u": lambda r: (1 + r) * math.log(1 + r),
        "I_b": lambda r: (b * r - math.log(1 + b * r)) / b**2,
    }
    sims, labels, ref_labels = similarities(queries, refs), labels.tolist(), ref_labels.tolist()
    means = []
    for q in range(len(labels)):
        found = retrieval(labels, ref_labels, q, offset, include_self, include_self)
        if found is None:
            continue
        positives, _ = found
        s = sims[q]
        negatives = [j for j, other in enumerate(ref_labels) if other != labels[q]]
        above = [sum(sigmoid((s[j] - s[i]) / temperature) for j in negatives) for i in positives]
        means.append(sum(functions[variant](r) for r in above) / len(positives))
    mean = sum(means) / len(means)
    return 1.0 - mean if variant == "D_q" else mean


LOOPS = {"roadmap": roadmap_loop, "recall_at_k": recall_at_k_loop, "pnp": pnp_loop}
CASES = [
    ("roadmap", {}),
    ("roadmap", {"include_self": False}),
    # wide regions of the SupAP step, so every branch (t <= 0, 0 < t <= delta, t > delta) is hit
    ("roadmap", {"temperature": 0.2, "delta": 0.3, "rho": 3.0, "offset": 0.7, "calibration_weight": 0.4}),
    ("recall_at_k", {}),
    ("recall_at_k", {"include_self": False}),
    ("recall_at_k", {"temperature": 0.2, "k_values": (1, 3, 30), "k_temperatures": (0.5, 1.0, 2.0)}),
    ("pnp", {}),
    ("pnp", {"include_self": False, "alpha": 1.5}),
    *[("pnp", {"variant": v, "temperature": 0.3}) for v in ("D_q", "O", "D_s", "I_u", "I_b")],
]


def case_id(case) -> str:
    name, params = case
    return name + "".join(f"-{k}={v}" for k, v in params.items())


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("seed", [0, 1])
def test_square_form_equals_the_formula_loop(case, seed):
    name, params = case
    emb, labels = uneven_batch(seed)  # shuffled classes of 1 to 5 members, a singleton among them
    value = get_loss(name, **params)(emb, labels).item()
    assert value == pytest.approx(LOOPS[name](emb, labels, emb, labels, 0, params), abs=1e-12, rel=0)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_queries_at_an_offset_against_batch_and_memory_equal_the_loop(case):
    name, params = case
    emb, labels = uneven_batch(2)
    memory, memory_labels = extra_items(2)
    refs, ref_labels = torch.cat([emb, memory]), torch.cat([labels, memory_labels])
    start, stop = 4, 13
    value = get_loss(name, **params)(emb[start:stop], labels[start:stop], refs, ref_labels, start).item()
    expected = LOOPS[name](emb[start:stop], labels[start:stop], refs, ref_labels, start, params)
    assert value == pytest.approx(expected, abs=1e-12, rel=0)


@pytest.mark.parametrize("case", CASES[::3] + [CASES[2]], ids=case_id)
def test_gradient_equals_finite_differences_of_the_loop(case):
    """dL/dE through queries and memory, against central differences of the loop (the embeddings are
    perturbed freely, off the sphere: the formulas only need dot products)."""
    name, params = case
    emb, labels = uneven_batch(3, counts=(3, 2, 4, 1, 3))
    memory, memory_labels = extra_items(3, count=5)
    ref_labels = torch.cat([labels, memory_labels])
    leaf, items = emb.clone().requires_grad_(True), memory.clone().requires_grad_(True)
    get_loss(name, **params)(leaf, labels, torch.cat([leaf, items]), ref_labels).backward()

    def loop(e: torch.Tensor, m: torch.Tensor) -> float:
        return LOOPS[name](e, labels, torch.cat([e, m]), ref_labels, 0, params)

    step = 1e-6
    for tensor, grad, other in ((emb, leaf.grad, memory), (memory, items.grad, emb)):
        numeric = torch.zeros_like(tensor)
        for index in range(tensor.numel()):
            plus, minus = tensor.clone(), tensor.clone()
            plus.view(-1)[index] += step
            minus.view(-1)[index] -= step
            pair = (plus, other), (minus, other)
            if tensor is memory:
                pair = (other, plus), (other, minus)
            numeric.view(-1)[index] = (loop(*pair[0]) - loop(*pair[1])) / (2 * step)
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grad, numeric, rtol=1e-5, atol=1e-7)


def test_roadmap_calibration_term_is_pytorch_metric_learnings_contrastive_loss():
    """Their CalibrationLoss subclasses PML's ContrastiveLoss on dot products: a second implementation."""
    emb, labels = uneven_batch(4)
    ours = get_loss("roadmap", calibration_weight=1.0)
    without = get_loss("roadmap", calibration_weight=0.0)
    similarity = distances.DotProductSimilarity()
    pml = pml_losses.ContrastiveLoss(pos_margin=0.9, neg_margin=0.6, distance=similarity)
    calibration = (ours(emb, labels) - without(emb, labels)).item()
    assert calibration > 0
    assert calibration == pytest.approx(pml(emb, labels).item(), abs=1e-12, rel=0)


def test_the_authors_p_by_k_batch_counts_the_query_in_its_own_rankings():
    """On their contiguous P x K layout, include_self (their code) and not differ: the query is an item."""
    gen = torch.Generator().manual_seed(5)
    emb = torch.nn.functional.normalize(torch.randn(12, 5, generator=gen, dtype=torch.float64), dim=1)
    labels = torch.arange(3).repeat_interleave(4)
    for name in LOOPS:
        with_self = get_loss(name)(emb, labels).item()
        assert with_self != pytest.approx(get_loss(name, include_self=False)(emb, labels).item(), abs=1e-6)
        assert with_self == pytest.approx(LOOPS[name](emb, labels, emb, labels, 0, {}), abs=1e-12, rel=0)


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("roadmap", {"temperature": 0.0}, "roadmap: temperature must be > 0, got 0.0"),
        ("roadmap", {"calibration_weight": -1.0}, "roadmap: calibration_weight must be >= 0"),
        ("recall_at_k", {"k_values": (1, 2), "k_temperatures": (1.0,)}, "recall_at_k: k_values and k_temp"),
        ("recall_at_k", {"k_values": (0,), "k_temperatures": (1.0,)}, "recall_at_k: every k must be >= 1"),
        ("pnp", {"variant": "PNP-D_q"}, "pnp: variant must be one of D_q, O, D_s, I_u, I_b, got 'PNP-D_q'"),
        ("pnp", {"alpha": 0.0}, "pnp: temperature, alpha and b must be > 0"),
    ],
)
def test_invalid_parameters_name_the_loss_and_value(name, params, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        get_loss(name, **params)


@pytest.mark.parametrize("name", sorted(LOOPS))
def test_a_batch_without_positive_pairs_gives_a_warned_zero(name):
    emb, _ = uneven_batch(0, counts=(1, 1, 1, 1))
    leaf = emb.clone().requires_grad_(True)
    with pytest.warns(UserWarning, match=f"{name}: batch has no positive pair"):
        value = get_loss(name)(leaf, torch.arange(4))
    value.backward()
    assert value.item() == 0.0 and torch.equal(leaf.grad, torch.zeros_like(leaf))


def test_roadmap_counts_a_tied_positive_above_its_twin():
    """Their Heaviside is 1 at 0: a duplicated image ranks above its twin, in both of their rankings."""
    emb, labels = uneven_batch(6)
    first, second = [j for j in range(len(labels)) if labels[j] == labels[0]][:2]
    emb[second] = emb[first]
    value = get_loss("roadmap")(emb, labels).item()
    assert value == pytest.approx(roadmap_loop(emb, labels, emb, labels, 0, {}), abs=1e-12, rel=0)


@pytest.mark.parametrize("name", ["recall_at_k", "pnp"])
def test_blocks_of_queries_add_up_to_the_square_form_with_its_gradient(name):
    """The losses are means of per-query terms: three blocks of queries against the whole batch, weighted by
    their queries, give the square form's value and gradient (through rows and columns) to 1e-12."""
    emb, labels = uneven_batch(7, counts=(3, 4, 2, 5, 3, 4))  # every query has a positive
    loss = get_loss(name)
    square_in = emb.clone().requires_grad_(True)
    square = loss(square_in, labels)
    square.backward()
    leaf, total = emb.clone().requires_grad_(True), 0.0
    for start, stop in ((0, 6), (6, 13), (13, len(labels))):
        block = loss(leaf[start:stop], labels[start:stop], leaf, labels, query_offset=start)
        weighted = block * (stop - start) / len(labels)
        weighted.backward()
        total += weighted.item()
    assert total == pytest.approx(square.item(), abs=1e-12, rel=0)
    torch.testing.assert_close(leaf.grad, square_in.grad, rtol=0, atol=1e-12)
