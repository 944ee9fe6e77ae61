"""dL/ds for every (query, item) similarity of a batch, for the report's gradient-analysis plots.

Method: the similarity matrix S = E E^T of the (unit) embeddings is made an autograd leaf, the loss is
evaluated as a function of S through its `forward_similarities(sims, labels)` (our own losses compute from
S directly; the pytorch-metric-learning wrappers get S through their distance modules, see losses/_pml.py),
and dL/dS is read off by autograd. Row q of S is query q's view of the batch, so entry (q, j) is the
gradient of the loss with respect to the similarity that ranks item j for query q. A loss that depends on
the embeddings only through S satisfies dL/dE = (G + G^T) E for G = dL/dS, which the tests check.
Computed in float64.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn


def similarity_gradients(loss: nn.Module, embeddings: Tensor, labels: Tensor) -> pd.DataFrame:
    """One row per (query, item != query): similarity, item's rank for the query (1 = most similar),
    is_positive (same label), and grad = dL/ds_qj. `loss` has the similarity form (its spec's
    `capabilities.similarity_form`)."""
    emb = embeddings.detach().to(torch.float64)
    labels = labels.detach().reshape(-1).to(emb.device)
    sims = (emb @ emb.T).requires_grad_(True)
    value = loss.forward_similarities(sims, labels)
    (grad,) = torch.autograd.grad(value, sims, allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(sims)
    return _table(sims.detach().cpu().numpy(), grad.cpu().numpy(), labels.cpu().numpy())


def _table(sims: np.ndarray, grad: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    batch = sims.shape[0]
    masked = sims.copy()
    np.fill_diagonal(masked, -np.inf)  # the query is not in its own ranking
    order = np.argsort(-masked, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(1, batch + 1)[None, :].repeat(batch, 0), axis=1)
    query, item = np.nonzero(~np.eye(batch, dtype=bool))
    return pd.DataFrame(
        {
            "query": query,
            "item": item,
            "similarity": sims[query, item],
            "rank": ranks[query, item],
            "is_positive": labels[query] == labels[item],
            "grad": grad[query, item],
        }
    )
