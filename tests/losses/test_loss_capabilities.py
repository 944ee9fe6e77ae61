"""A loss's capabilities are resolved once, at registration, and stored on its spec: every registered loss has
them, and each one agrees with what the loss does when it is called that way."""

from __future__ import annotations

import pytest
import torch

import losses
from losses import LossCapabilities, available_losses, get_loss, get_spec, make_spec

REGISTERED = available_losses()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """12 float64 unit embeddings of 4 classes x 3, shuffled: every query has a positive."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(3)[torch.randperm(12, generator=gen)]
    return torch.nn.functional.normalize(
        torch.randn(12, 6, generator=gen, dtype=torch.float64), dim=1
    ), labels


def seeded(call, seed: int = 0) -> torch.Tensor:
    """`call()` from a fixed random state (Blackbox AP draws its margin)."""
    torch.manual_seed(seed)
    return call()


@pytest.mark.parametrize("name", REGISTERED)
def test_every_registered_loss_has_its_capabilities_on_its_spec(name):
    capabilities = get_spec(name).capabilities
    assert isinstance(capabilities, LossCapabilities)
    assert capabilities.refs_form, f"{name}: every packaged loss takes the queries x gallery form"
    assert capabilities.has_parameters == any(True for _ in get_loss(name).parameters())


@pytest.mark.parametrize("name", REGISTERED)
def test_the_queries_x_gallery_form_against_the_batch_is_the_square_form(name):
    emb, labels = batch()
    loss = get_loss(name)
    square = seeded(lambda: loss(emb, labels))
    refs = seeded(lambda: loss(emb, labels, emb, labels.clone(), query_offset=0))
    torch.testing.assert_close(refs, square, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", [n for n in REGISTERED if get_spec(n).capabilities.similarity_form])
def test_a_loss_with_the_similarity_form_gives_its_value_from_the_similarities(name):
    emb, labels = batch()
    loss = get_loss(name)
    from_sims = seeded(lambda: loss.forward_similarities(emb @ emb.T, labels))
    torch.testing.assert_close(from_sims, seeded(lambda: loss(emb, labels)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", [n for n in REGISTERED if get_spec(n).capabilities.splits_by_query])
def test_a_loss_that_splits_by_query_is_the_mean_of_its_per_query_rows(name):
    emb, labels = batch()
    loss = get_loss(name)
    rows = [
        seeded(lambda q=q: loss(emb[q : q + 1], labels[q : q + 1], emb, labels, query_offset=q))
        for q in range(12)
    ]
    torch.testing.assert_close(
        torch.stack(rows).mean(), seeded(lambda: loss(emb, labels)), rtol=1e-10, atol=1e-12
    )


class SquareOnly(torch.nn.Module):
    def forward(self, embeddings, labels):
        return embeddings.sum() * 0.0


class WithProxies(torch.nn.Module):
    splits_by_query = True

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.proxies = torch.nn.Parameter(torch.zeros(classes, 4))

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None, query_offset=0):
        return (embeddings @ self.proxies.T).mean()

    def forward_similarities(self, sims, labels):
        return sims.mean()


def test_capabilities_are_read_from_the_class_at_registration():
    assert make_spec("square_only", SquareOnly).capabilities == LossCapabilities(False, False, False, False)
    assert make_spec("with_proxies", WithProxies).capabilities == LossCapabilities(True, True, True, True)
    assert make_spec("not_a_module", object).capabilities == LossCapabilities(False, False, False, False)


def test_registering_a_loss_leaves_the_random_state_as_it_was(monkeypatch):
    monkeypatch.setattr(losses, "_REGISTRY", dict(losses._REGISTRY))
    torch.manual_seed(5)
    losses.register("with_proxies", WithProxies)
    drawn = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(drawn, torch.rand(3))
