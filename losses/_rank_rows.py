"""What the smooth-rank losses after Smooth-AP share (ROADMAP, the Recall@k surrogate, PNP).

Each of them ranks, for a query q and each of its positives i, the items j of q's retrieval set by
s_qj - s_qi. `rank_rows` gives those differences for the queries that have a positive, grouped by class
size as Smooth-AP groups them (`losses.smooth_ap.query_groups`), so a group is one dense n x m x M tensor:
no B x B x B tensor, any label order. `RankRowsLoss` writes the two call forms once: the square form
(the batch against itself, through `forward_similarities`) and the queries x gallery form (`losses._refs`).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from losses._refs import check_refs
from losses.smooth_ap import query_groups


class RankRows(NamedTuple):
    """One group of n queries with m positives each, against the M items of the retrieval set."""

    diff: Tensor  # [n, m, M]: s_qj - s_qi for positive i of query q and item j
    items: Tensor  # [n, m, M] bool: j is ranked against i (j != i; j != q unless the query is an item)
    same: Tensor  # [n, 1, M] bool: j has the query's label (q's own column included)


def rank_rows(
    sims: Tensor,
    labels: Tensor,
    ref_labels: Tensor,
    query_offset: int,
    self_positive: bool,
    self_item: bool,
) -> list[RankRows]:
    """The groups of queries that have a positive other than themselves, from B x M similarities whose column
    `query_offset + q` is query q. `self_positive`: q is one of its own positives i; `self_item`: q's column
    is an item j of the ranking of its positives (implied by `self_positive`)."""
    self_item = self_item or self_positive
    columns = torch.arange(sims.shape[1], device=sims.device)
    groups = []
    for queries, positives in query_groups(labels, self_positive, sims.device, ref_labels, query_offset):
        rows = sims[queries]
        anchor = rows.gather(1, positives)
        diff = rows.unsqueeze(1) - anchor.unsqueeze(2)
        items = columns.view(1, 1, -1) != positives.unsqueeze(2)
        if not self_item:
            items = items & (columns.view(1, 1, -1) != (queries + query_offset).view(-1, 1, 1))
        same = ref_labels.view(1, 1, -1) == labels[queries].view(-1, 1, 1)
        groups.append(RankRows(diff, items, same))
    return groups


class RankRowsLoss(torch.nn.Module):
    """The call forms of a loss written as `loss_from_similarities(sims, labels, ref_labels, query_offset)`,
    which returns None when no query has a positive (the loss is then a warned zero)."""

    name = "rank_rows"

    def loss_from_similarities(
        self, sims: Tensor, labels: Tensor, ref_labels: Tensor, query_offset: int
    ) -> Tensor | None:
        raise NotImplementedError

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
        query_offset: int = 0,
    ) -> Tensor:
        """The batch against itself, or the queries against `ref_embeddings` (`losses._refs`)."""
        dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
        # sigmoid arguments are similarity differences over small temperatures: keep them in fp32
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            emb = embeddings.to(dtype)
            if ref_embeddings is None:
                if emb.dim() != 2 or emb.shape[0] != labels.numel():
                    raise ValueError(
                        f"{self.name}: expected embeddings [B, D] and labels [B], got {tuple(emb.shape)} "
                        f"and {tuple(labels.shape)}"
                    )
                return self.forward_similarities(emb @ emb.T, labels)
            labels, ref_labels = check_refs(self.name, emb, labels, ref_embeddings, ref_labels, query_offset)
            sims = emb @ ref_embeddings.to(dtype).T
            return self._or_zero(self.loss_from_similarities(sims, labels, ref_labels, query_offset), sims)

    def forward_similarities(self, sims: Tensor, labels: Tensor) -> Tensor:
        """The loss as a function of the B x B similarity matrix (row q = query q's similarities)."""
        labels = labels.reshape(-1).to(sims.device)
        return self._or_zero(self.loss_from_similarities(sims, labels, labels, 0), sims)

    def _or_zero(self, loss: Tensor | None, sims: Tensor) -> Tensor:
        """`loss`, or a zero connected to the graph (warning once) when no query had a positive."""
        if loss is not None:
            return loss
        if not getattr(self, "_warned", False):
            warnings.warn(f"{self.name}: batch has no positive pair; loss is 0", stacklevel=4)
            self._warned = True
        return sims.sum() * 0.0
