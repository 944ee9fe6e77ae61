"""Smooth-AP (Brown et al., ECCV 2020): exact, label-aware, and O(B * P * B) instead of O(B^3).

For query q with similarities s, positives P_q (same label, q excluded) and retrieval set O_q (all but q):

    AP_q = 1/|P_q| sum_{i in P_q} (1 + sum_{j in P_q, j != i} sig((s_qj - s_qi)/T))
                                  / (1 + sum_{j in O_q, j != i} sig((s_qj - s_qi)/T))

and the loss is 1 - mean AP_q over the queries that have at least one positive. Only the rows of the
(query, positive) pairs are ever needed, so the work is B * P * B for P positives per query. The authors'
released code materialises a B x B x B tensor instead and needs equal, contiguous class blocks.

`include_self=True` reproduces the released code: the query is one of its own positives and a member of its
retrieval set. Queries with no other same-label item are skipped in both modes.

The ranking part is a custom autograd Function over the similarity matrix: the forward pass keeps only the
per-pair numerators and denominators, the backward pass recomputes the sigmoids chunk by chunk (or reuses them when one chunk holds every pair) and applies
the analytic gradient, so peak memory is O(B^2 + chunk * B) and never B^3.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from losses import register


def positive_pairs(labels: Tensor, include_self: bool) -> tuple[Tensor, Tensor, Tensor, int]:
    """(query, positive) index pairs sorted by query, each pair's weight 1/(|P_q| * #queries), #queries.

    Built from a stable sort of the labels, in O(number of pairs) memory (no B x B mask).
    """
    labels = labels.reshape(-1)
    order = torch.argsort(labels, stable=True)
    _, inverse, class_counts = torch.unique(labels, return_inverse=True, return_counts=True)
    class_start = torch.cumsum(class_counts, 0) - class_counts  # block start in `order`
    per_query = class_counts[inverse]  # same-label items per query, itself included
    q_idx = torch.repeat_interleave(torch.arange(labels.numel(), device=labels.device), per_query)
    offsets = torch.arange(q_idx.numel(), device=labels.device) - torch.repeat_interleave(
        torch.cumsum(per_query, 0) - per_query, per_query
    )
    i_idx = order[class_start[inverse[q_idx]] + offsets]
    keep = per_query[q_idx] >= 2  # the query has at least one positive other than itself
    if not include_self:
        keep &= i_idx != q_idx
    q_idx, i_idx = q_idx[keep], i_idx[keep]
    num_queries = int((per_query >= 2).sum())
    positives = per_query if include_self else per_query - 1
    weight = 1.0 / (positives[q_idx].double() * max(num_queries, 1))
    return q_idx, i_idx, weight, num_queries


def _chunk_sigmoids(sims: Tensor, q: Tensor, i: Tensor, temperature: float, include_self: bool) -> Tensor:
    """sig((s_qj - s_qi)/T) for a chunk of pairs, zero where j is excluded (j == i; j == q without self)."""
    rows = sims[q]  # a copy, modified in place below
    rows.sub_(sims[q, i].unsqueeze(1)).div_(temperature).sigmoid_()
    rows.scatter_(1, i.unsqueeze(1), 0.0)
    if not include_self:
        rows.scatter_(1, q.unsqueeze(1), 0.0)
    return rows


class _Gram(torch.autograd.Function):
    """S = E E^T with a one-matmul backward, dE = (G + G^T) E (autograd's mm backward takes two)."""

    @staticmethod
    def forward(ctx, emb):
        ctx.save_for_backward(emb)
        return emb @ emb.T

    @staticmethod
    def backward(ctx, grad):
        (emb,) = ctx.saved_tensors
        return (grad + grad.T) @ emb


class _SmoothAPRanking(torch.autograd.Function):
    """Loss from a similarity matrix, with chunked forward and an analytic, recomputing backward."""

    @staticmethod
    def forward(ctx, sims, labels, q_idx, i_idx, weight, temperature, include_self, chunk):
        numer = torch.empty(q_idx.numel(), dtype=sims.dtype, device=sims.device)
        denom = torch.empty_like(numer)
        for start in range(0, q_idx.numel(), chunk):
            q, i = q_idx[start : start + chunk], i_idx[start : start + chunk]
            sig = _chunk_sigmoids(sims, q, i, temperature, include_self)
            positive = labels.unsqueeze(0) == labels[q].unsqueeze(1)
            denom[start : start + chunk] = 1.0 + sig.sum(1)
            numer[start : start + chunk] = 1.0 + torch.where(positive, sig, 0.0).sum(1)
        ctx.save_for_backward(sims, labels, q_idx, i_idx, weight, numer, denom)
        ctx.settings = (temperature, include_self, chunk)
        # One chunk holds every pair: keep its sigmoids (O(P * B) memory) rather than recompute them.
        ctx.single_chunk = (sig, positive) if q_idx.numel() <= chunk else None
        return 1.0 - (weight.to(sims.dtype) * numer / denom).sum()

    @staticmethod
    def backward(ctx, grad_output):
        sims, labels, q_idx, i_idx, weight, numer, denom = ctx.saved_tensors
        temperature, include_self, chunk = ctx.settings
        grad = torch.zeros_like(sims)
        # dL/dr_qi = -w_qi;  dr/dsig_j = [j in P]/D - N/D^2;  dsig_j/ds_qj = sig(1-sig)/T = -dsig_j/ds_qi
        scale = -grad_output * weight.to(sims.dtype) / temperature
        for start in range(0, q_idx.numel(), chunk):
            stop = start + chunk
            q, i = q_idx[start:stop], i_idx[start:stop]
            if ctx.single_chunk is not None:
                cached_sig, positive = ctx.single_chunk
                sig = cached_sig.clone()  # a second backward (retain_graph) must find it unchanged
            else:
                sig = _chunk_sigmoids(sims, q, i, temperature, include_self)
                positive = labels.unsqueeze(0) == labels[q].unsqueeze(1)
            inv_d = (1.0 / denom[start:stop]).unsqueeze(1)
            n_over_d2 = (numer[start:stop] / denom[start:stop] ** 2).unsqueeze(1)
            coef = torch.where(positive, inv_d - n_over_d2, -n_over_d2)
            sig.mul_(1.0 - sig).mul_(coef).mul_(scale[start:stop].unsqueeze(1))
            grad.index_add_(0, q, sig)
            grad.index_put_((q, i), -sig.sum(1), accumulate=True)
        return grad, None, None, None, None, None, None, None


def smooth_ap_loss_from_similarities(
    sims: Tensor,
    labels: Tensor,
    temperature: float = 0.01,
    include_self: bool = False,
    chunk_elements: int = 2**22,
) -> Tensor | None:
    """1 - mean Smooth-AP from a B x B similarity matrix; None when no query has a positive."""
    if sims.dim() != 2 or sims.shape[0] != sims.shape[1] or sims.shape[0] != labels.numel():
        raise ValueError(f"sims must be B x B for B = {labels.numel()} labels, got {tuple(sims.shape)}")
    labels = labels.reshape(-1).to(sims.device)
    q_idx, i_idx, weight, num_queries = positive_pairs(labels, include_self)
    if num_queries == 0:
        return None
    chunk = max(1, chunk_elements // sims.shape[1])
    return _SmoothAPRanking.apply(
        sims, labels, q_idx, i_idx, weight, float(temperature), bool(include_self), chunk
    )


class SmoothAP(torch.nn.Module):
    """1 - mean Smooth-AP over the batch's queries; any label order, uneven class counts."""

    def __init__(self, temperature: float = 0.01, include_self: bool = False, chunk_elements: int = 2**22):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"smooth_ap: temperature must be > 0, got {temperature}")
        if chunk_elements < 1:
            raise ValueError(f"smooth_ap: chunk_elements must be >= 1, got {chunk_elements}")
        self.temperature = float(temperature)
        self.include_self = bool(include_self)
        self.chunk_elements = int(chunk_elements)
        self._warned = False

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        if embeddings.dim() != 2 or embeddings.shape[0] != labels.numel():
            raise ValueError(
                f"smooth_ap: expected embeddings [B, D] and labels [B], got {tuple(embeddings.shape)} "
                f"and {tuple(labels.shape)}"
            )
        dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
        # Sigmoid arguments are differences of similarities divided by a small T: keep them in fp32.
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            emb = embeddings.to(dtype)
            return self.forward_similarities(_Gram.apply(emb), labels)

    def forward_similarities(self, sims: Tensor, labels: Tensor) -> Tensor:
        """The loss as a function of the B x B similarity matrix (row q = query q's similarities)."""
        loss = smooth_ap_loss_from_similarities(
            sims, labels, self.temperature, self.include_self, self.chunk_elements
        )
        if loss is None:
            if not self._warned:
                warnings.warn("smooth_ap: batch has no positive pair; loss is 0", stacklevel=3)
                self._warned = True
            return sims.sum() * 0.0
        return loss


DEFAULTS = {"temperature": 0.01, "include_self": False}


def search_space(trial) -> dict:
    return {"temperature": trial.suggest_float("temperature", 1e-3, 1e-1, log=True)}


register("smooth_ap", SmoothAP, DEFAULTS, search_space, miner=None)
