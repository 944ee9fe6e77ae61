"""Contrastive loss (pytorch-metric-learning) on all pairs, Euclidean distance between unit vectors.

Positive pairs are pulled inside `pos_margin`, negative pairs pushed beyond `neg_margin`; distances of unit
vectors lie in [0, 2].
"""

from __future__ import annotations

from pytorch_metric_learning import losses as pml_losses

from losses import register
from losses._pml import PMLLoss


class Contrastive(PMLLoss):
    """Hinge on positive distances above `pos_margin` and negative distances below `neg_margin`."""

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0):
        if not 0.0 <= pos_margin < neg_margin:
            raise ValueError(
                f"contrastive: need 0 <= pos_margin < neg_margin, got {pos_margin}, {neg_margin}"
            )
        super().__init__(pml_losses.ContrastiveLoss(pos_margin=pos_margin, neg_margin=neg_margin))


def search_space(trial) -> dict:
    pos_margin = trial.suggest_float("pos_margin", 0.0, 0.5)
    return {"pos_margin": pos_margin, "neg_margin": trial.suggest_float("neg_margin", 0.6, 1.6)}


register("contrastive", Contrastive, search_space)
