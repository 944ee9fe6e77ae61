"""The base of the pytorch-metric-learning wrappers, and their evaluation on a given similarity matrix.

`PMLLoss` holds a PML loss and an optional PML miner; a wrapper module only builds and validates the two
from its constructor's arguments.

For gradient introspection: PML losses and miners compute their own distance matrix from the embeddings
through a `.distance` module. Here every such module is temporarily replaced by one that returns a matrix
derived from the given similarities S of unit vectors: S itself for cosine similarity, ||a - b|| =
sqrt(2 - 2 s) (to the distance's power) for the Euclidean distance. Autograd then flows into S, row q holding
anchor/query q's view.

Queries x gallery form (`losses._refs`): PML 2.9's losses and miners take `ref_emb, ref_labels`, but with
PML's meaning: ref items are other items than the queries, so nothing is left out as "self". Here the ref
items hold the queries at `query_offset`, so the pairs and triplets mined against them are cleared of each
query's own column afterwards (what PML's CrossBatchMemory does with `remove_self_comparisons`); the loss
then reduces over the pairs or triplets anchored at the queries. With the ref items equal to the batch this
is the square form exactly. Under torchrun every rank computes the global loss on the gathered batch
(`splits_by_query` is False): PML reduces over all pairs or triplets of the batch at once (the mean of the
non-zero terms), so ranks' shares of the queries would not add up to the loss of the whole batch.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from pytorch_metric_learning.distances import BaseDistance, CosineSimilarity, DotProductSimilarity, LpDistance
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.miners import BaseMiner
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
from torch import Tensor, nn

from losses._refs import check_refs


def distance_matrix(distance: BaseDistance, sims: Tensor) -> Tensor:
    """What `distance` would return for unit vectors whose dot products are `sims`."""
    if isinstance(distance, CosineSimilarity | DotProductSimilarity):
        return sims if distance.power == 1 else sims**distance.power
    if isinstance(distance, LpDistance) and distance.p == 2 and distance.normalize_embeddings:
        squared = (2.0 - 2.0 * sims).clamp_min(0.0)
        if distance.power == 2:
            return squared
        off_diagonal = ~torch.eye(sims.shape[0], dtype=torch.bool, device=sims.device)
        # sqrt has an infinite slope at 0 (the diagonal): keep it out of the graph there.
        dist = torch.where(off_diagonal, torch.where(off_diagonal, squared, 1.0).sqrt(), 0.0)
        return dist if distance.power == 1 else dist**distance.power
    raise TypeError(f"cannot express {type(distance).__name__} through dot products of unit vectors")


@contextmanager
def precomputed_distances(module: nn.Module, sims: Tensor) -> Iterator[None]:
    """Within the block, every PML distance inside `module` returns the matrix derived from `sims`."""
    swapped = []
    for owner in module.modules():
        original = getattr(owner, "distance", None)
        if isinstance(original, BaseDistance):
            fixed = copy.copy(original)
            matrix = distance_matrix(original, sims)
            fixed.forward = lambda *args, _m=matrix, **kwargs: _m.clone()  # miners write into it
            swapped.append((owner, original))
            owner.distance = fixed
    try:
        yield
    finally:
        for owner, original in swapped:
            owner.distance = original


def drop_own_columns(indices: tuple[Tensor, ...], query_offset: int) -> tuple[Tensor, ...]:
    """Mined (anchor, positive, negative) triplets or (anchor, positive, anchor, negative) pairs without those
    whose positive is the anchor's own column `query_offset + anchor` (a negative never is: its label
    differs)."""
    anchors, positives = indices[0], indices[1]
    keep = positives != anchors + query_offset
    if len(indices) == 3:
        return anchors[keep], positives[keep], indices[2][keep]
    return anchors[keep], positives[keep], indices[2], indices[3]


class PMLLoss(nn.Module):
    """A PML loss on the pairs or triplets its miner picks (every pair or triplet without a miner)."""

    splits_by_query = False  # PML reduces over the pairs or triplets of the whole batch
    name = "pml"  # the registry name, for error messages

    def __init__(self, loss: BaseMetricLossFunction, miner: BaseMiner | None = None):
        super().__init__()
        self.loss = loss
        self.miner = miner

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
        query_offset: int = 0,
    ) -> Tensor:
        """The batch against itself, or the queries against `ref_embeddings` (`losses._refs`)."""
        if ref_embeddings is None:
            if self.miner is None:
                return self.loss(embeddings, labels)
            return self.loss(embeddings, labels, self.miner(embeddings, labels))
        labels, ref_labels = check_refs(
            self.name, embeddings, labels, ref_embeddings, ref_labels, query_offset
        )
        indices = self.ref_indices(embeddings, labels, ref_embeddings, ref_labels, query_offset)
        return self.loss(embeddings, labels, indices, ref_embeddings, ref_labels)

    def ref_indices(
        self, embeddings: Tensor, labels: Tensor, refs: Tensor, ref_labels: Tensor, query_offset: int
    ) -> tuple[Tensor, ...]:
        """The miner's pairs or triplets of queries against ref items (all pairs without a miner), without
        each query's own column."""
        if self.miner is None:
            indices = lmu.get_all_pairs_indices(labels, ref_labels)
        else:
            indices = self.miner(embeddings, labels, refs, ref_labels)
        return drop_own_columns(indices, query_offset)

    def forward_similarities(self, sims: Tensor, labels: Tensor) -> Tensor:
        """The loss as a function of the similarity matrix, for losses.introspect."""
        placeholder = torch.zeros(sims.shape[0], 1, dtype=sims.dtype, device=sims.device)
        with precomputed_distances(self, sims):
            return self(placeholder, labels.to(sims.device))
