"""Blackbox AP (Rolinek et al., CVPR 2020, "Optimizing Rank-based Metrics with Blackbox Differentiation").

The forward pass computes exact ranks by sorting and AP_q = 1/|P_q| sum_{i in P_q} rank_pos(i) / rank_all(i),
so with margin 0 the loss is exactly 1 - mAP of the batch (each query against all other items).

Ranking is the combinatorial solver rank(s) = argmin_pi <s, pi> (rank 1 = highest score). Following
Vlastelica et al. (ICLR 2020), its backward pass perturbs the scores by lambda times the incoming gradient,
re-ranks, and returns the gradient of the piecewise-linear interpolation of the loss,

    dL/ds = -(rank(s) - rank(s + lambda * dL/drank)) / lambda,

i.e. (rank(perturbed) - rank) / lambda: a positive whose rank should fall (dL/drank > 0) gets its score pushed
up past the items it overtakes in the perturbed ranking.

`lambda_val` is given per query: the effective lambda is lambda_val times the number of queries, so its value
does not depend on the batch size. `margin` lowers positive and raises negative scores before ranking (the
paper's score margin), so ranks count near-ties as errors.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from losses import register


def descending_ranks(scores: Tensor) -> Tensor:
    """Row-wise ranks, 1 = highest score; ties broken by position (stable sort)."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    positions = torch.arange(1, scores.shape[-1] + 1, device=scores.device).expand_as(order)
    ranks.scatter_(-1, order, positions)
    return ranks.to(scores.dtype)


class BlackboxRank(torch.autograd.Function):
    """Exact ranks forward; blackbox-differentiation gradient backward."""

    @staticmethod
    def forward(ctx, scores: Tensor, lambda_val: float) -> Tensor:
        ranks = descending_ranks(scores)
        ctx.save_for_backward(scores, ranks)
        ctx.lambda_val = lambda_val
        return ranks

    @staticmethod
    def backward(ctx, grad_ranks: Tensor):
        scores, ranks = ctx.saved_tensors
        perturbed = descending_ranks(scores + ctx.lambda_val * grad_ranks)
        return (perturbed - ranks) / ctx.lambda_val, None


def blackbox_ap_loss_from_similarities(
    sims: Tensor, labels: Tensor, lambda_val: float = 4.0, margin: float = 0.02
) -> Tensor | None:
    """1 - mean blackbox AP from a B x B similarity matrix; None when no query has a positive."""
    labels = labels.reshape(-1).to(sims.device)
    batch = labels.numel()
    if sims.shape != (batch, batch):
        raise ValueError(f"sims must be B x B for B = {batch} labels, got {tuple(sims.shape)}")
    not_self = ~torch.eye(batch, dtype=torch.bool, device=sims.device)
    positive = (labels.unsqueeze(0) == labels.unsqueeze(1)) & not_self
    queries = positive.any(1)
    num_queries = int(queries.sum())
    if num_queries == 0:
        return None
    sims, positive, not_self = sims[queries], positive[queries], not_self[queries]
    shifted = sims + margin * torch.where(positive, -1.0, 1.0).to(sims.dtype)
    lam = lambda_val * num_queries
    rank_all = BlackboxRank.apply(shifted.masked_fill(~not_self, float("-inf")), lam)
    rank_pos = BlackboxRank.apply(shifted.masked_fill(~positive, float("-inf")), lam)
    precision = torch.where(positive, rank_pos / rank_all, 0.0)
    ap = precision.sum(1) / positive.sum(1)
    return 1.0 - ap.mean()


class BlackboxAP(torch.nn.Module):
    """1 - mean AP with exact ranks and blackbox-differentiation gradients."""

    def __init__(self, lambda_val: float = 4.0, margin: float = 0.02):
        super().__init__()
        if lambda_val <= 0:
            raise ValueError(f"blackbox_ap: lambda_val must be > 0, got {lambda_val}")
        if margin < 0:
            raise ValueError(f"blackbox_ap: margin must be >= 0, got {margin}")
        self.lambda_val = float(lambda_val)
        self.margin = float(margin)
        self._warned = False

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            emb = embeddings.to(dtype)
            return self.forward_similarities(emb @ emb.T, labels)

    def forward_similarities(self, sims: Tensor, labels: Tensor) -> Tensor:
        """The loss as a function of the B x B similarity matrix (row q = query q's similarities)."""
        loss = blackbox_ap_loss_from_similarities(sims, labels, self.lambda_val, self.margin)
        if loss is None:
            if not self._warned:
                warnings.warn("blackbox_ap: batch has no positive pair; loss is 0", stacklevel=3)
                self._warned = True
            return sims.sum() * 0.0
        return loss


def search_space(trial) -> dict:
    return {
        "lambda_val": trial.suggest_float("lambda_val", 0.5, 50.0, log=True),
        "margin": trial.suggest_float("margin", 0.0, 0.2),
    }


register("blackbox_ap", BlackboxAP, search_space)
