"""Gradient introspection: dL/ds against finite differences and the chain rule through E E^T."""

import numpy as np
import pytest
import torch

from losses import available_losses, get_loss
from losses.introspect import similarity_gradients


def batch():
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2, 1, 3])
    emb = torch.nn.functional.normalize(
        torch.randn(labels.numel(), 4, generator=gen, dtype=torch.float64), dim=1
    )
    return emb, labels


def to_matrix(table, batch_size: int) -> torch.Tensor:
    grad = torch.zeros(batch_size, batch_size, dtype=torch.float64)
    grad[table["query"].to_numpy().copy(), table["item"].to_numpy().copy()] = torch.tensor(
        table["grad"].to_numpy().copy()
    )
    return grad


def test_smooth_ap_matches_finite_differences():
    emb, labels = batch()
    loss = get_loss("smooth_ap", temperature=0.1)
    table = similarity_gradients(loss, emb, labels)
    sims = emb @ emb.T
    step = 1e-6
    for row in table.itertuples():
        plus, minus = sims.clone(), sims.clone()
        plus[row.query, row.item] += step
        minus[row.query, row.item] -= step
        numeric = (loss.forward_similarities(plus, labels) - loss.forward_similarities(minus, labels)) / (
            2 * step
        )
        assert abs(row.grad - numeric.item()) < 1e-8


def test_ranks_and_positives():
    emb, labels = batch()
    table = similarity_gradients(get_loss("smooth_ap"), emb, labels)
    assert len(table) == 9 * 8
    for q, rows in table.groupby("query"):
        assert sorted(rows["rank"]) == list(range(1, 9))
        by_rank = rows.sort_values("rank")["similarity"].to_numpy()
        assert np.all(np.diff(by_rank) <= 0)
        assert list(rows["is_positive"]) == [bool(labels[q] == labels[j]) for j in rows["item"]]


@pytest.mark.parametrize("name", available_losses())
def test_chain_rule_through_gram_matrix(name):
    """For unit embeddings, dL/dE tangent to the sphere equals that of (G + G^T) E with G = dL/dS."""
    emb, labels = batch()
    loss = get_loss(name)
    torch.manual_seed(0)  # a loss may draw random numbers (blackbox_ap's margin): the same draws in both
    table = similarity_gradients(loss, emb, labels)
    grad_s = to_matrix(table, emb.shape[0])
    leaf = emb.clone().requires_grad_(True)
    torch.manual_seed(0)
    loss(leaf, labels).backward()

    def tangent(g):
        return g - (g * emb).sum(1, keepdim=True) * emb

    torch.testing.assert_close(tangent((grad_s + grad_s.T) @ emb), tangent(leaf.grad), rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("name", available_losses())
def test_forward_similarities_gives_the_loss_value(name):
    """The loss as a function of S = E E^T is the loss of E: the values the gradient plots differentiate."""
    emb, labels = batch()
    loss = get_loss(name)
    torch.manual_seed(0)
    from_sims = loss.forward_similarities(emb @ emb.T, labels)
    torch.manual_seed(0)
    torch.testing.assert_close(from_sims, loss(emb, labels), rtol=1e-12, atol=0)
