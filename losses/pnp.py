"""PNP (Li et al., AAAI 2022, "Rethinking the Optimization of Average Precision: Only Penalizing Negative
Instances before Positive Ones is Enough").

Reference: the authors' code, interestingzhuo/PNPloss (`criteria/PNP.py`, `Criterion`), with the recipe of its
README's best run, `--variant PNP-D_q --alpha 4`, and `parameters.py`'s `--anneal 0.01` and `--b 2`. (Its
`parameters.py` defaults to `PNP-O` with alpha 1, as pytorch-metric-learning's `PNPLoss` does; that is not the
recipe.) For query q with positives P_q and negatives N_q, the smooth count of negatives above positive i is

    R_qi = sum_{j in N_q} sigmoid((s_qj - s_qi) / temperature),

and with the mean over queries and over each query's positives, the loss is 1 - mean (1 + R_qi)^-alpha for
`D_q` (the default), and mean f(R_qi) for the other variants: `O` R, `D_s` log(1 + R), `I_u` (1 + R)
log(1 + R), `I_b` (b R - log(1 + b R)) / b^2.

`include_self=True` (the default) is their code: the query is one of its own positives (its R is that of
similarity 1). Queries with no other same-label item are skipped.

Known deviations from their code: the sigmoid's argument is not clamped to [-50, 50] (each sigmoid differs by
under 2e-22); any batch layout (theirs needs equal, contiguous class blocks of the configured batch size); a
query without another positive is left out of the mean (in their P x K batches there is none); alpha is a
float (their flag takes an integer).

Queries x gallery form (`losses._refs`): the same formula row by row on B x M similarities, query q's own
column at `query_offset + q`. The loss is a mean of per-query terms, but under torchrun every rank computes
the global loss on the gathered batch (`splits_by_query` is False): the split form's other float32 matmuls,
magnified by the temperature, left two processes' weights too far from one process's (see the class).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from losses import register
from losses._rank_rows import RankRowsLoss, rank_rows

VARIANTS = ("D_q", "O", "D_s", "I_u", "I_b")


def penalty(count: Tensor, variant: str, alpha: float, b: float) -> Tensor:
    """The variant's function of R, the smooth count of negatives above a positive."""
    if variant == "D_q":
        return (1.0 + count).pow(-alpha)
    if variant == "O":
        return count
    if variant == "D_s":
        return torch.log1p(count)
    if variant == "I_u":
        return (1.0 + count) * torch.log1p(count)
    return (b * count - torch.log1p(b * count)) / b**2


class PNP(RankRowsLoss):
    """Penalises only the negatives ranked above each positive, through a decreasing function of their
    count."""

    name = "pnp"
    # a mean of per-query terms, yet computed globally under torchrun: split by query, the similarities come
    # from other float32 matmuls, and at temperature 0.01 that rounding moved two processes' weights 1e-4
    # from one process's in six Adam steps (tests/train/test_distributed.py); globally, 3e-6
    splits_by_query = False

    def __init__(
        self,
        variant: Literal["D_q", "O", "D_s", "I_u", "I_b"] = "D_q",
        alpha: float = 4.0,
        temperature: float = 0.01,
        b: float = 2.0,
        include_self: bool = True,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"pnp: variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if temperature <= 0 or alpha <= 0 or b <= 0:
            raise ValueError(f"pnp: temperature, alpha and b must be > 0, got {temperature}, {alpha} and {b}")
        self.variant = variant
        self.alpha, self.temperature, self.b = float(alpha), float(temperature), float(b)
        self.include_self = bool(include_self)

    def loss_from_similarities(
        self, sims: Tensor, labels: Tensor, ref_labels: Tensor, query_offset: int
    ) -> Tensor | None:
        groups = rank_rows(sims, labels, ref_labels, query_offset, self.include_self, self.include_self)
        if not groups:
            return None
        total, count = 0.0, 0
        for group in groups:
            above = (torch.sigmoid(group.diff / self.temperature) * ~group.same).sum(2)  # R, [n, m]
            terms = penalty(above, self.variant, self.alpha, self.b)
            total, count = total + terms.mean(1).sum(), count + terms.shape[0]
        mean = total / count
        return 1.0 - mean if self.variant == "D_q" else mean


def search_space(trial) -> dict:
    return {
        # alpha: the authors' 4 (README recipe) and pytorch-metric-learning's default 1 lie inside, on a log
        # range reaching 16x either side of 4
        "alpha": trial.suggest_float("alpha", 0.25, 64.0, log=True),
        # temperature (their anneal): their 0.01 lies inside; the range is smooth_ap's
        "temperature": trial.suggest_float("temperature", 1e-3, 1.0, log=True),
    }


register("pnp", PNP, search_space)
