"""The base of the pytorch-metric-learning wrappers, and their evaluation on a given similarity matrix.

`PMLLoss` holds a PML loss and an optional PML miner; a wrapper module only builds and validates the two
from its constructor's arguments.

For gradient introspection: PML losses and miners compute their own distance matrix from the embeddings
through a `.distance` module. Here every such module is temporarily replaced by one that returns a matrix
derived from the given similarities S of unit vectors: S itself for cosine similarity, ||a - b|| =
sqrt(2 - 2 s) (to the distance's power) for the Euclidean distance. Autograd then flows into S, row q holding
anchor/query q's view.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from pytorch_metric_learning.distances import BaseDistance, CosineSimilarity, DotProductSimilarity, LpDistance
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.miners import BaseMiner
from torch import Tensor, nn


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


class PMLLoss(nn.Module):
    """A PML loss on the pairs or triplets its miner picks (every pair or triplet without a miner)."""

    def __init__(self, loss: BaseMetricLossFunction, miner: BaseMiner | None = None):
        super().__init__()
        self.loss = loss
        self.miner = miner

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        if self.miner is None:
            return self.loss(embeddings, labels)
        return self.loss(embeddings, labels, self.miner(embeddings, labels))

    def forward_similarities(self, sims: Tensor, labels: Tensor) -> Tensor:
        """The loss as a function of the similarity matrix, for losses.introspect."""
        placeholder = torch.zeros(sims.shape[0], 1, dtype=sims.dtype, device=sims.device)
        with precomputed_distances(self, sims):
            return self(placeholder, labels.to(sims.device))
