"""ROADMAP (Ramzi et al., NeurIPS 2021, "Robust and Decomposable Average Precision for Image Retrieval").

Reference: the authors' code, elias-ramzi/ROADMAP: `roadmap/losses/smooth_rank_ap.py` (`SupAP`, `step_rank`,
`SmoothRankAP.quick_forward`), `roadmap/losses/calibration_loss.py` (`CalibrationLoss`) and the defaults of
`roadmap/config/loss/roadmap.yaml` (SupAP tau 0.01, rho 100, offset 1.44, delta 0.05, start 0.5, weight 1;
calibration pos_margin 0.9, neg_margin 0.6, weight 1), the config of their SOP and CUB results.

The loss is SupAP + calibration_weight * calibration. SupAP is 1 - mean AP_q with, for query q, its positives
P_q and the items j ranked against positive i (q's retrieval set without i):

    AP_q = 1/|P_q| sum_{i in P_q} (1 + sum_{j in P_q, j != i} H(s_qj - s_qi))
                       / (1 + sum_{j in P_q, j != i} H(s_qj - s_qi) + sum_{j in N_q} R(s_qj - s_qi))

with H the Heaviside step (H(0) = 1; no gradient: positives are not ranked against each other) and R the
SupAP step for a negative j at t = s_qj - s_qi: sigmoid(t / tau) for t <= 0, start + sigmoid(t / tau) for
0 < t <= delta, rho * t + offset for t > delta (their code's form: a negative above a positive costs at least
start + 1/2 and its gradient never vanishes). The calibration term is pytorch-metric-learning's contrastive
loss on dot-product similarities, which their `CalibrationLoss` subclasses: the mean of relu(pos_margin - s)
over the positive pairs where it is non-zero, plus the mean of relu(s - neg_margin) over the negative pairs
where it is non-zero (the pairs are (query, other item)).

`include_self=True` (the default) is their `quick_forward`: the query is one of its own positives and an item
of every ranking. Queries with no other same-label item are skipped.

Known deviations from their code: the sigmoid's argument is not clamped to [-50, 50] (each sigmoid differs by
under 2e-22); any batch layout; a query without another positive is left out of the mean (in their P x K
batches there is none); with a cross-batch memory (the harness's `loss.memory_size`) the queries are ranked
against the batch and the memory together, where theirs adds a second loss of the queries against the
memory alone, weighted by `memory.weight`; the calibration term is written out here (checked against
pytorch-metric-learning's contrastive loss in the tests) rather than subclassed.

Queries x gallery form (`losses._refs`): the same formula row by row on B x M similarities, query q's own
column at `query_offset + q`. `splits_by_query` is False: the calibration term averages over the non-zero
pairs of the whole batch, so under torchrun every rank computes the global loss on the gathered batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from losses import register
from losses._rank_rows import RankRows, RankRowsLoss, rank_rows
from losses._refs import own_columns


def supap_step(
    diff: Tensor, temperature: float, rho: float, offset: float, delta: float, start: float
) -> Tensor:
    """R(t): the smoothed count of a negative at t = s_qj - s_qi in the rank of positive i."""
    sig = torch.sigmoid(diff / temperature)
    return torch.where(diff <= 0, sig, torch.where(diff <= delta, start + sig, rho * diff + offset))


def supap_loss(groups: list[RankRows], **step: float) -> Tensor:
    """1 - mean AP_q over the queries of `groups`, every query's AP a mean over its positives."""
    total, count = 0.0, 0
    for group in groups:
        positive, negative = group.items & group.same, group.items & ~group.same
        above = (group.diff >= 0).to(group.diff.dtype)  # H, with H(0) = 1
        rank_pos = 1.0 + (above * positive).sum(2)
        rank_all = rank_pos + (supap_step(group.diff, **step) * negative).sum(2)
        ap = (rank_pos / rank_all).mean(1)
        total, count = total + ap.sum(), count + ap.numel()
    return 1.0 - total / count


def nonzero_mean(values: Tensor) -> Tensor:
    """The mean of the non-zero entries (pytorch-metric-learning's AvgNonZeroReducer); 0 if there are none."""
    values = values[values > 0]
    return values.mean() if values.numel() else values.sum()


def calibration_loss(
    sims: Tensor, labels: Tensor, ref_labels: Tensor, query_offset: int, pos_margin: float, neg_margin: float
) -> Tensor:
    """Contrastive loss on similarities over the (query, item) pairs, each query's own column left out."""
    same = labels.unsqueeze(1) == ref_labels.unsqueeze(0)
    own = own_columns(labels.numel(), ref_labels.numel(), query_offset, sims.device)
    positive = torch.relu(pos_margin - sims)[same & ~own]
    negative = torch.relu(sims - neg_margin)[~same]
    return nonzero_mean(positive) + nonzero_mean(negative)


class Roadmap(RankRowsLoss):
    """SupAP (a smooth AP whose rank is an upper bound of the true one) plus a calibration loss."""

    name = "roadmap"
    splits_by_query = False  # the calibration term averages over the non-zero pairs of the whole batch

    def __init__(
        self,
        temperature: float = 0.01,
        rho: float = 100.0,
        offset: float = 1.44,
        delta: float = 0.05,
        start: float = 0.5,
        calibration_weight: float = 1.0,
        pos_margin: float = 0.9,
        neg_margin: float = 0.6,
        include_self: bool = True,
    ):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"roadmap: temperature must be > 0, got {temperature}")
        if rho < 0 or delta < 0:
            raise ValueError(f"roadmap: rho and delta must be >= 0, got rho={rho}, delta={delta}")
        if calibration_weight < 0:
            raise ValueError(f"roadmap: calibration_weight must be >= 0, got {calibration_weight}")
        self.step = {
            "temperature": float(temperature),
            "rho": float(rho),
            "offset": float(offset),
            "delta": float(delta),
            "start": float(start),
        }
        self.calibration_weight = float(calibration_weight)
        self.pos_margin, self.neg_margin = float(pos_margin), float(neg_margin)
        self.include_self = bool(include_self)

    def loss_from_similarities(
        self, sims: Tensor, labels: Tensor, ref_labels: Tensor, query_offset: int
    ) -> Tensor | None:
        groups = rank_rows(sims, labels, ref_labels, query_offset, self.include_self, self.include_self)
        if not groups:
            return None
        loss = supap_loss(groups, **self.step)
        if self.calibration_weight > 0:
            calibration = calibration_loss(
                sims, labels, ref_labels, query_offset, self.pos_margin, self.neg_margin
            )
            loss = loss + self.calibration_weight * calibration
        return loss


def search_space(trial) -> dict:
    return {
        # temperature (their tau): 0.01 in every config of theirs, as Smooth-AP's paper; the range is
        # smooth_ap's, so the two are tuned alike
        "temperature": trial.suggest_float("temperature", 1e-3, 1.0, log=True),
        # rho: 100 in their configs; their grid over this slope, then named tau, for a sibling loss
        # (jean-zay/submit_scripts/grid_tau_sop.slurm, marginap_sigmo_abs on iNaturalist) tried 0, 0.1, 2, 5,
        # 10 and 100: the range holds those but 0, a decade below 0.1 and 100x above 100
        "rho": trial.suggest_float("rho", 0.01, 1e4, log=True),
        # calibration_weight: 1 in roadmap.yaml; 0 is SupAP alone (their supap.yaml), a natural bound
        "calibration_weight": trial.suggest_float("calibration_weight", 0.0, 3.0),
    }


register("roadmap", Roadmap, search_space)
