"""The Recall@k surrogate (Patel, Tolias and Matas, CVPR 2022, "Recall@k Surrogate Loss with Large Batches
and Similarity Mixup").

Reference: the authors' code, yash0307/RecallatK_surrogate: `src/losses.py` (`RecallatK`) and the defaults of
`src/main.py` (`--sigmoid_temperature 0.01`, `--k_vals_train 1 2 4 8 16`, `--k_temperatures 1 2 4 8 16`,
`--mixup 0`). For query q with positives P_q (q excluded), the smooth rank of positive i among the items j of
q's ranking and the smooth Recall@k are

    r_qi = 1 + sum_{j != i} sigmoid((s_qj - s_qi) / temperature),
    R@k_q = min(k, sum_{i in P_q} sigmoid((k - r_qi) / tau_k)) / min(k, |P_q|),

and the loss is the mean over queries of 1 - (mean over the k of `k_values` of R@k_q), tau_k the matching
entry of `k_temperatures`. Each k is capped at the number M of ref items (their `min(batch_size, k)`).

`include_self=True` (the default) is their code: the query is an item of the ranking of its positives (its
similarity to itself, 1, ranks above them), though never a positive term. Queries with no other same-label
item are skipped.

Known deviations from their code: similarity mixup (their `--mixup`, off by default) is not implemented; the
sigmoid's argument is not clamped to [-50, 50] (each sigmoid differs by under 2e-22); any batch layout (theirs
needs equal, contiguous class blocks); the loss is computed for all queries at once, where their training
loop sums one call per query (the same value); a query without another positive is left out of the mean.

Queries x gallery form (`losses._refs`): the same formula row by row on B x M similarities, query q's own
column at `query_offset + q`. The loss is a mean of per-query terms, but under torchrun every rank computes
the global loss on the gathered batch (`splits_by_query` is False): the split form's other float32 matmuls,
magnified by the temperature, left two processes' weights too far from one process's (see the class).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from losses import register
from losses._rank_rows import RankRowsLoss, rank_rows


class RecallAtK(RankRowsLoss):
    """1 - mean over queries and over k of a smooth Recall@k."""

    name = "recall_at_k"
    # a mean of per-query terms, yet computed globally under torchrun: split by query, the similarities come
    # from other float32 matmuls, and at temperature 0.01 that rounding moved two processes' weights 1e-4
    # from one process's in six Adam steps (tests/train/test_distributed.py); globally, 3e-6
    splits_by_query = False

    def __init__(
        self,
        temperature: float = 0.01,
        k_values: Sequence[int] = (1, 2, 4, 8, 16),
        k_temperatures: Sequence[float] = (1.0, 2.0, 4.0, 8.0, 16.0),
        include_self: bool = True,
    ):
        super().__init__()
        k_values, k_temperatures = tuple(int(k) for k in k_values), tuple(float(t) for t in k_temperatures)
        if temperature <= 0:
            raise ValueError(f"recall_at_k: temperature must be > 0, got {temperature}")
        if not k_values or len(k_values) != len(k_temperatures):
            raise ValueError(
                f"recall_at_k: k_values and k_temperatures must be non-empty and of one length, got "
                f"{k_values} and {k_temperatures}"
            )
        if min(k_values) < 1 or min(k_temperatures) <= 0:
            raise ValueError(
                f"recall_at_k: every k must be >= 1 and every k temperature > 0, got {k_values} and "
                f"{k_temperatures}"
            )
        self.temperature = float(temperature)
        self.k_values, self.k_temperatures = k_values, k_temperatures
        self.include_self = bool(include_self)

    def loss_from_similarities(
        self, sims: Tensor, labels: Tensor, ref_labels: Tensor, query_offset: int
    ) -> Tensor | None:
        groups = rank_rows(sims, labels, ref_labels, query_offset, False, self.include_self)
        if not groups:
            return None
        size = sims.shape[1]
        total, count = 0.0, 0
        for group in groups:
            rank = 1.0 + (torch.sigmoid(group.diff / self.temperature) * group.items).sum(2)  # [n, m]
            positives = rank.shape[1]
            recall = 0.0
            for k, tau in zip(self.k_values, self.k_temperatures, strict=True):
                k = min(k, size)
                hits = torch.sigmoid((k - rank) / tau).sum(1).clamp(max=k)
                recall = recall + hits / min(k, positives)
            total = total + (1.0 - recall / len(self.k_values)).sum()
            count += rank.shape[0]
        return total / count


def search_space(trial) -> dict:
    # temperature: their 0.01 (as Smooth-AP's paper) lies inside; the range is smooth_ap's, so the two rank
    # alike. k_values and k_temperatures stay the authors' (src/main.py sets them alike for every
    # dataset; only the evaluated k differ).
    return {"temperature": trial.suggest_float("temperature", 1e-3, 1.0, log=True)}


register("recall_at_k", RecallAtK, search_space)
