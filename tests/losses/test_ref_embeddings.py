"""The queries x gallery form of every loss, `loss(embeddings, labels, ref_embeddings, ref_labels,
query_offset)`: against float64 loops written from the formulas (Smooth-AP row by row, Blackbox AP's exact
ranks), and against the square form where the two must agree (ref items = the batch; a block of queries is a
subset of the square form's terms)."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

import losses
from losses import get_loss


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=1)


def uneven_batch(seed: int, counts=(1, 2, 3, 5, 4, 2), dim: int = 6):
    """Shuffled classes of 1 to 5 members (a singleton has no positive), float64 unit vectors."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    labels = labels[torch.randperm(labels.numel(), generator=gen)]
    return unit(torch.randn(labels.numel(), dim, generator=gen, dtype=torch.float64)), labels


def extra_items(seed: int, count: int = 7, dim: int = 6, classes: int = 8):
    """Items that are not queries (a memory): labels shared with the batch's classes and new ones."""
    gen = torch.Generator().manual_seed(100 + seed)
    labels = torch.randint(0, classes, (count,), generator=gen)
    return unit(torch.randn(count, dim, generator=gen, dtype=torch.float64)), labels


def smooth_ap_rows(
    queries, labels, refs, ref_labels, offset, temperature, include_self
) -> list[float | None]:
    """1 - AP_q for each query straight from the definition (None: no positive), with Python loops; query q
    is ref item offset + q and is not in its own retrieval set (unless include_self)."""
    sims = (queries.double() @ refs.double().T).tolist()
    labels, ref_labels = labels.tolist(), ref_labels.tolist()

    def sig(x: float) -> float:
        return 1.0 / (1.0 + math.exp(-x / temperature))

    rows = []
    for q, label in enumerate(labels):
        own = offset + q
        positives = [j for j, other in enumerate(ref_labels) if other == label and j != own]
        if not positives:
            rows.append(None)
            continue
        retrieval = [j for j in range(len(ref_labels)) if j != own]
        if include_self:
            positives, retrieval = positives + [own], retrieval + [own]
        total = 0.0
        for i in positives:
            numer = 1.0 + sum(sig(sims[q][j] - sims[q][i]) for j in positives if j != i)
            denom = 1.0 + sum(sig(sims[q][j] - sims[q][i]) for j in retrieval if j != i)
            total += numer / denom
        rows.append(1.0 - total / len(positives))
    return rows


@pytest.mark.parametrize("include_self", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_smooth_ap_row_by_row_equals_the_formula_and_the_square_form(include_self, seed):
    """Each query alone against the batch is its own term of the square form, to 1e-10 in float64."""
    emb, labels = uneven_batch(seed)
    loss = get_loss("smooth_ap", temperature=0.05, include_self=include_self, chunk_elements=30)
    expected = smooth_ap_rows(emb, labels, emb, labels, 0, 0.05, include_self)
    square = loss(emb, labels).item()
    terms = [t for t in expected if t is not None]
    assert abs(square - sum(terms) / len(terms)) < 1e-10
    for q, term in enumerate(expected):
        if term is None:
            continue  # a query without a positive: its row alone has no term (a warned zero)
        row = loss(emb[q : q + 1], labels[q : q + 1], emb, labels.clone(), query_offset=q).item()
        assert abs(row - term) < 1e-10, q


@pytest.mark.parametrize("include_self", [False, True])
@pytest.mark.parametrize("chunk_elements", [25, 2**22])
def test_smooth_ap_blocks_of_queries_add_up_to_the_square_form_with_its_gradient(
    include_self, chunk_elements
):
    """Three ranks' blocks of queries against the whole batch: their terms, weighted by their queries,
    give the square form's value and gradient to 1e-10 (the gradient through rows and columns both)."""
    emb, labels = uneven_batch(2)
    loss = get_loss("smooth_ap", temperature=0.05, include_self=include_self, chunk_elements=chunk_elements)
    square_in = emb.clone().requires_grad_(True)
    square = loss(square_in, labels)
    square.backward()
    counted = [t is not None for t in smooth_ap_rows(emb, labels, emb, labels, 0, 0.05, include_self)]
    leaf = emb.clone().requires_grad_(True)
    total = 0.0
    for start, stop in ((0, 5), (5, 11), (11, len(labels))):
        block = loss(leaf[start:stop], labels[start:stop], leaf, labels, query_offset=start)
        weighted = block * sum(counted[start:stop]) / sum(counted)
        weighted.backward()
        total += weighted.item()
    assert abs(total - square.item()) < 1e-10
    torch.testing.assert_close(leaf.grad, square_in.grad, rtol=0, atol=1e-10)


@pytest.mark.parametrize("include_self", [False, True])
def test_smooth_ap_against_a_memory_equals_the_formula_with_gradcheck(include_self):
    emb, labels = uneven_batch(3)
    memory, memory_labels = extra_items(3)
    loss = get_loss("smooth_ap", temperature=0.1, include_self=include_self, chunk_elements=40)
    refs, ref_labels = torch.cat([emb, memory]), torch.cat([labels, memory_labels])
    rows = [t for t in smooth_ap_rows(emb, labels, refs, ref_labels, 0, 0.1, include_self) if t is not None]
    assert abs(loss(emb, labels, refs, ref_labels).item() - sum(rows) / len(rows)) < 1e-10
    leaf = emb.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: loss(e, labels, torch.cat([e, memory]), ref_labels), (leaf,))


# ---- pytorch-metric-learning losses: the ref form against PML's own square form ----

PML_CASES = [
    ("contrastive", {}),
    ("contrastive", {"pos_margin": 0.3, "neg_margin": 1.2}),
    # a margin near the distances of unit vectors mines many triplets whose positive is the anchor itself
    ("triplet", {"miner": "all", "margin": 1.0}),
    ("triplet", {"miner": "semihard", "margin": 1.0}),
    ("triplet", {"miner": "hard", "margin": 0.3}),
    ("triplet", {"miner": "batch_hard", "margin": 0.2}),
    ("multi_similarity", {}),
    ("multi_similarity", {"epsilon": 1.5}),  # keeps nearly every pair: the own column matters
    ("fastap", {}),
]


def case_id(case) -> str:
    name, params = case
    return name + "".join(f"-{k}={v}" for k, v in params.items())


@pytest.mark.parametrize("case", PML_CASES, ids=case_id)
@pytest.mark.parametrize("seed", [0, 1])
def test_pml_ref_form_with_the_batch_as_ref_items_is_the_square_form(case, seed):
    """The own column is left out as the square form leaves out the diagonal: same value and gradient.
    The batch has a singleton, whose only 'positive' in the ref items is itself."""
    name, params = case
    emb, labels = uneven_batch(seed)
    loss = get_loss(name, **params)
    square_in, ref_in = emb.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    square = loss(square_in, labels)
    square.backward()
    value = loss(ref_in, labels, ref_in, labels.clone())
    value.backward()
    assert square.item() > 0
    assert abs(value.item() - square.item()) < 1e-12
    torch.testing.assert_close(ref_in.grad, square_in.grad, rtol=0, atol=1e-12)


def square_terms_of_anchors(name: str, params: dict, items, item_labels, anchors: torch.Tensor):
    """PML's square form over `items`, reduced over the mined pairs/triplets whose anchor is in `anchors`:
    the loss of those queries against every item, computed by PML's own square path."""
    loss = get_loss(name, **params)
    pml = loss.loss
    if loss.miner is None:
        indices = lmu.get_all_pairs_indices(item_labels)
    else:
        indices = loss.miner(items, item_labels)
    if len(indices) == 3:
        keep = torch.isin(indices[0], anchors)
        indices = tuple(t[keep] for t in indices)
    else:
        keep_pos, keep_neg = torch.isin(indices[0], anchors), torch.isin(indices[2], anchors)
        indices = (indices[0][keep_pos], indices[1][keep_pos], indices[2][keep_neg], indices[3][keep_neg])
    value = pml(items, item_labels, indices)
    if name == "multi_similarity":  # PML averages the per-anchor terms over every row of the matrix
        value = value * len(item_labels) / len(anchors)
    return value


@pytest.mark.parametrize("case", [c for c in PML_CASES if c[0] != "fastap"], ids=case_id)
def test_pml_queries_against_batch_and_memory_equal_the_square_form_on_the_concatenation(case):
    name, params = case
    emb, labels = uneven_batch(4)
    memory, memory_labels = extra_items(4)
    items, item_labels = torch.cat([emb, memory]), torch.cat([labels, memory_labels])
    value = get_loss(name, **params)(emb, labels, items, item_labels)
    expected = square_terms_of_anchors(name, params, items, item_labels, torch.arange(len(labels)))
    assert value.item() > 0
    assert abs(value.item() - expected.item()) < 1e-12


@pytest.mark.parametrize("case", [c for c in PML_CASES if c[0] != "fastap"], ids=case_id)
def test_pml_a_block_of_queries_at_an_offset_takes_the_square_form_terms_of_its_anchors(case):
    name, params = case
    emb, labels = uneven_batch(5)
    start, stop = 6, 13
    value = get_loss(name, **params)(emb[start:stop], labels[start:stop], emb, labels.clone(), start)
    expected = square_terms_of_anchors(name, params, emb, labels, torch.arange(start, stop))
    assert abs(value.item() - expected.item()) < 1e-12


def fastap_rows(queries, labels, refs, ref_labels, offset, num_bins) -> list[float | None]:
    """1 - FastAP_q per query from its definition (squared distances soft-binned by triangular pulses)."""
    delta = 4.0 / num_bins
    centres = [k * delta for k in range(num_bins + 1)]
    rows = []
    for q in range(len(labels)):
        others = [j for j in range(len(ref_labels)) if j != offset + q]
        positive = {j for j in others if ref_labels[j] == labels[q]}
        if not positive:
            rows.append(None)
            continue
        pos_hist, all_hist = [0.0] * len(centres), [0.0] * len(centres)
        for j in others:
            d2 = float(((queries[q] - refs[j]) ** 2).sum())
            for k, centre in enumerate(centres):
                pulse = max(0.0, 1 - abs(d2 - centre) / delta)
                all_hist[k] += pulse
                pos_hist[k] += pulse if j in positive else 0.0
        ap, cum_pos, cum_all = 0.0, 0.0, 0.0
        for h_pos, h_all in zip(pos_hist, all_hist, strict=True):
            cum_pos, cum_all = cum_pos + h_pos, cum_all + h_all
            if h_pos * cum_pos > 0:
                ap += h_pos * cum_pos / cum_all
        rows.append(1 - ap / len(positive))
    return rows


@pytest.mark.parametrize("start,stop,with_memory", [(0, 19, True), (4, 11, False), (0, 1, False)])
def test_fastap_ref_form_equals_the_formula_per_query(start, stop, with_memory):
    emb, labels = uneven_batch(6, counts=(3, 2, 4, 1, 5, 4))
    refs, ref_labels = emb, labels.clone()
    if with_memory:
        memory, memory_labels = extra_items(6)
        refs, ref_labels = torch.cat([emb, memory]), torch.cat([labels, memory_labels])
    value = get_loss("fastap", num_bins=8)(emb[start:stop], labels[start:stop], refs, ref_labels, start)
    rows = [t for t in fastap_rows(emb[start:stop], labels[start:stop], refs, ref_labels, start, 8) if t]
    assert abs(value.item() - sum(rows) / len(rows)) < 1e-12


# ---- Blackbox AP ----


def exact_ap_rows(queries, labels, refs, ref_labels, offset) -> list[float | None]:
    """AP_q with exact ranks (counted), query q's own ref item left out; None without a positive."""
    sims = (queries @ refs.T).tolist()
    rows = []
    for q in range(len(labels)):
        items = [j for j in range(len(ref_labels)) if j != offset + q]
        positive = [j for j in items if ref_labels[j] == labels[q]]
        if not positive:
            rows.append(None)
            continue

        row = sims[q]

        def rank(j, among, row=row):
            return 1 + sum(1 for k in among if row[k] > row[j])

        rows.append(sum(rank(i, positive) / rank(i, items) for i in positive) / len(positive))
    return rows


@pytest.mark.parametrize("params", [{}, {"interclass_coef": 0.3}, {"variant": "both_ranks"}])
def test_blackbox_ref_form_with_the_batch_as_ref_items_is_the_square_form(params):
    """The same margins are drawn (one per (query, item) pair, in the same order) and the same gradient."""
    emb, labels = uneven_batch(7)
    loss = get_loss("blackbox_ap", lambda_val=3.0, margin=0.1, **params)
    square_in, ref_in = emb.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    torch.manual_seed(11)
    square = loss(square_in, labels)
    square.backward()
    torch.manual_seed(11)
    value = loss(ref_in, labels, ref_in, labels.clone())
    value.backward()
    assert value.item() == square.item()
    assert square_in.grad.abs().sum() > 0
    torch.testing.assert_close(ref_in.grad, square_in.grad, rtol=0, atol=1e-12)


def test_blackbox_blocks_of_queries_are_exact_ap_and_add_up_to_the_square_gradient():
    """Without margin each query's ranking is its own: blocks at offsets are 1 - mean exact AP, and their
    gradients, weighted by their queries, add up to the square form's."""
    emb, labels = uneven_batch(8)
    loss = get_loss("blackbox_ap", lambda_val=4.0, margin=0.0)
    square_in = emb.clone().requires_grad_(True)
    loss(square_in, labels).backward()
    counted = [a is not None for a in exact_ap_rows(emb, labels, emb, labels, 0)]
    leaf = emb.clone().requires_grad_(True)
    for start, stop in ((0, 7), (7, 12), (12, len(labels))):
        block = loss(leaf[start:stop], labels[start:stop], leaf, labels, query_offset=start)
        aps = [a for a in exact_ap_rows(emb[start:stop], labels[start:stop], emb, labels, start) if a]
        assert abs(block.item() - (1 - sum(aps) / len(aps))) < 1e-12
        (block * sum(counted[start:stop]) / sum(counted)).backward()
    torch.testing.assert_close(leaf.grad, square_in.grad, rtol=0, atol=1e-12)


def test_blackbox_interclass_term_ranks_the_pairs_of_the_queries_at_their_offset():
    """With the interclass term alone, a block of queries against the batch ranks the (query, other query)
    pairs of the block: the square form of the block by itself."""
    emb, labels = uneven_batch(12)
    loss = get_loss("blackbox_ap", margin=0.0, interclass_coef=1.0)
    start, stop = 5, 16
    block = emb[start:stop]
    value = loss(block, labels[start:stop], emb, labels.clone(), query_offset=start)
    assert abs(value.item() - loss(block, labels[start:stop]).item()) < 1e-12


def test_blackbox_against_a_memory_is_exact_ap_over_batch_and_memory():
    emb, labels = uneven_batch(9)
    memory, memory_labels = extra_items(9)
    refs, ref_labels = torch.cat([emb, memory]), torch.cat([labels, memory_labels])
    value = get_loss("blackbox_ap", margin=0.0)(emb, labels, refs, ref_labels)
    aps = [a for a in exact_ap_rows(emb, labels, refs, ref_labels, 0) if a is not None]
    assert abs(value.item() - (1 - sum(aps) / len(aps))) < 1e-12


def test_blackbox_batch_memory_and_ref_items_cannot_be_combined():
    emb, labels = uneven_batch(0)
    with pytest.raises(ValueError, match="blackbox_ap: batch_memory .* loss.memory_size"):
        get_loss("blackbox_ap", batch_memory=2)(emb, labels, emb, labels)


# ---- every registered loss ----


@pytest.mark.parametrize("name", losses.available_losses())
def test_every_loss_takes_queries_against_ref_items_and_sends_gradient_to_both(name):
    emb, labels = uneven_batch(10, counts=(4, 4, 4, 4))
    memory, memory_labels = extra_items(10, classes=4)
    queries, items = emb.clone().requires_grad_(True), memory.clone().requires_grad_(True)
    value = get_loss(name)(queries, labels, torch.cat([queries, items]), torch.cat([labels, memory_labels]))
    value.backward()
    assert torch.isfinite(value) and value.item() > 0
    assert queries.grad.abs().sum() > 0 and items.grad.abs().sum() > 0


@pytest.mark.parametrize("name", losses.available_losses())
def test_every_loss_refuses_ref_items_that_do_not_hold_the_queries(name):
    emb, labels = uneven_batch(11, counts=(4, 4, 4))
    loss = get_loss(name)
    with pytest.raises(ValueError, match=rf"{name}: ref_labels\[2:14\] differ from the queries' labels"):
        loss(emb, labels, torch.cat([emb[:2], emb]), torch.cat([labels[:2], labels.roll(1)]), query_offset=2)
    with pytest.raises(ValueError, match=rf"{name}: query_offset 3 puts the 12 queries outside the 14"):
        loss(emb, labels, torch.cat([emb[:2], emb]), torch.cat([labels[:2], labels]), query_offset=3)
    with pytest.raises(ValueError, match=rf"{name}: ref_embeddings needs ref_labels"):
        loss(emb, labels, emb)


def test_splits_by_query_is_declared_where_the_loss_is_a_mean_of_query_terms():
    splitting = [n for n in losses.available_losses() if losses.get_spec(n).capabilities.splits_by_query]
    assert splitting == ["smooth_ap"]
