"""The loss of one step's embeddings, composed from strategies instead of branching on the run's setup.

A `Spread` says which batch the loss sees and how a process's part of it is reduced: `OneProcess` (the batch
itself), or `GlobalBatch` under torchrun (the gathered global batch, see `bench.train.distributed`). An
`Items` strategy extends the retrieval set: `NoMemory`, or `MemoryItems` (the cross-batch memory,
`bench.train.memory`). `BatchLoss` composes the two with the loss, so a step asks it for `LossTerms` and
never looks at the setup; any spread composes with any items strategy and with either step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

from torch import Tensor, nn

from bench.train.distributed import Distributed, counted_queries, scale_gradient
from bench.train.memory import CrossBatchMemory


@dataclass
class LossTerms:
    """One process's part of a step's loss."""

    backward: Tensor  # what this process backpropagates
    value: float  # the loss of the whole (global) batch
    grad_scale: float  # this process's dL/dE comes out as grad_scale times the global batch's


@dataclass(frozen=True)
class Retrieval:
    """What the loss ranks: the queries against the items, which hold the queries at `offset`."""

    queries: Tensor
    labels: Tensor
    items: Tensor
    item_labels: Tensor
    offset: int = 0

    @property
    def square(self) -> bool:
        """The batch against itself: the loss's square form."""
        return self.items is self.queries


class Spread(Protocol):
    """Which batch a process's loss sees, and how its loss becomes its part of the step's."""

    world_size: int

    def retrieval(self, embeddings: Tensor, labels: Tensor) -> Retrieval: ...

    def terms(self, loss: Tensor, retrieval: Retrieval) -> LossTerms: ...

    def grad_norm(self, grad: Tensor, terms: LossTerms) -> float: ...


class OneProcess:
    """One process: the batch against itself, its loss the step's."""

    world_size = 1

    def retrieval(self, embeddings: Tensor, labels: Tensor) -> Retrieval:
        return Retrieval(embeddings, labels, embeddings, labels)

    def terms(self, loss: Tensor, retrieval: Retrieval) -> LossTerms:
        return LossTerms(loss, float(loss.detach()), 1.0)

    def grad_norm(self, grad: Tensor, terms: LossTerms) -> float:
        return float(grad.norm())


@dataclass(frozen=True)
class GlobalBatch:
    """Under torchrun: every loss sees the global batch. A loss that `splits_by_query` takes this rank's
    queries against it, any other computes the global loss on every rank (`bench.train.distributed`)."""

    dist: Distributed
    splits_by_query: bool

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    def retrieval(self, embeddings: Tensor, labels: Tensor) -> Retrieval:
        dist, splits = self.dist, self.splits_by_query
        if not splits:  # every rank backpropagates the global loss into its own block only
            embeddings = scale_gradient(embeddings, dist.world_size)
        batch = dist.gather(embeddings, sum_back=splits)
        batch_labels = dist.gather(labels, sum_back=False)
        dist.share_random_state()
        if splits:  # this rank's queries, against the global batch
            return Retrieval(embeddings, labels, batch, batch_labels, dist.rank * labels.numel())
        return Retrieval(batch, batch_labels, batch, batch_labels)  # the global loss, on every rank

    def terms(self, loss: Tensor, retrieval: Retrieval) -> LossTerms:
        world = float(self.dist.world_size)
        if not self.splits_by_query:
            return LossTerms(loss, float(loss.detach()), world)
        # split: each rank's loss is a mean over its own counted queries; weighed by its share of them, the
        # ranks' losses sum to the global loss, and the summed-back gradients to N times its gradient
        counted = counted_queries(retrieval.labels, retrieval.item_labels)
        total = self.dist.total_count(counted)
        if not total:  # no query anywhere has a positive: every rank's loss is a zero
            return LossTerms(loss, 0.0, world)
        value = float(self.dist.sum(loss.detach() * counted)) / total
        return LossTerms(scale_gradient(loss, world * counted / total), value, world)

    def grad_norm(self, grad: Tensor, terms: LossTerms) -> float:
        return float(self.dist.sum(grad.double().pow(2).sum()).sqrt()) / terms.grad_scale


class Items(Protocol):
    """What the retrieval set holds beyond the batch, and what the batch leaves behind for later steps."""

    def extend(self, batch: Retrieval, step: int) -> Retrieval: ...

    def after_loss(self, batch: Retrieval, step: int) -> None: ...


class NoMemory:
    """The retrieval set is the batch."""

    def extend(self, batch: Retrieval, step: int) -> Retrieval:
        return batch

    def after_loss(self, batch: Retrieval, step: int) -> None:
        pass


@dataclass(frozen=True)
class MemoryItems:
    """From the memory's start step on, the batch's items followed by the memory's; the batch joins the
    memory after its loss, so no query meets a detached copy of itself."""

    memory: CrossBatchMemory

    def extend(self, batch: Retrieval, step: int) -> Retrieval:
        if not self.memory.active(step):
            return batch
        items, item_labels = self.memory.with_batch(batch.items, batch.item_labels)
        return replace(batch, items=items, item_labels=item_labels)

    def after_loss(self, batch: Retrieval, step: int) -> None:
        if self.memory.active(step):
            self.memory.push(batch.items, batch.item_labels)


@dataclass(frozen=True)
class BatchLoss:
    """`loss_fn` on the retrieval set that `spread` and `items` make of a step's embeddings."""

    loss_fn: nn.Module
    spread: Spread
    items: Items

    def __call__(self, embeddings: Tensor, labels: Tensor, step: int) -> LossTerms:
        """The loss terms of training step `step` (counted from 0 over the run)."""
        batch = self.spread.retrieval(embeddings, labels)
        seen = self.items.extend(batch, step)
        if seen.square:
            loss = self.loss_fn(seen.queries, seen.labels)
        else:
            loss = self.loss_fn(
                seen.queries, seen.labels, seen.items, seen.item_labels, query_offset=seen.offset
            )
        self.items.after_loss(batch, step)
        return self.spread.terms(loss, seen)

    def grad_norm(self, grad: Tensor | None, terms: LossTerms) -> float:
        """The norm of dL/dE over the whole (global) batch, from this process's rows."""
        return 0.0 if grad is None else self.spread.grad_norm(grad, terms)

    def images(self, labels: Tensor) -> int:
        """Images of the global batch (each rank embeds its share)."""
        return labels.numel() * self.spread.world_size


def batch_loss(
    loss_fn: nn.Module, splits_by_query: bool, dist: Distributed | None, memory: CrossBatchMemory | None
) -> BatchLoss:
    """The composition a run's setup asks for: one process or the global batch, with or without a memory."""
    spread = OneProcess() if dist is None else GlobalBatch(dist, splits_by_query)
    return BatchLoss(loss_fn, spread, NoMemory() if memory is None else MemoryItems(memory))
