"""Contrastive loss (pytorch-metric-learning) on all pairs, Euclidean distance between unit vectors.

Positive pairs are pulled inside `pos_margin`, negative pairs pushed beyond `neg_margin`; distances of unit
vectors lie in [0, 2].
"""

from __future__ import annotations

from pytorch_metric_learning import losses as pml_losses
from torch import Tensor, nn

from losses import register
from losses._pml import pml_forward_similarities


class Contrastive(nn.Module):
    """Hinge on positive distances above `pos_margin` and negative distances below `neg_margin`."""

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0):
        super().__init__()
        if not 0.0 <= pos_margin < neg_margin:
            raise ValueError(
                f"contrastive: need 0 <= pos_margin < neg_margin, got {pos_margin}, {neg_margin}"
            )
        self.loss = pml_losses.ContrastiveLoss(pos_margin=pos_margin, neg_margin=neg_margin)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return self.loss(embeddings, labels)

    def forward_similarities(self, sims: Tensor, labels: Tensor) -> Tensor:
        """The loss as a function of the similarity matrix, for losses.introspect."""
        return pml_forward_similarities(self, sims, labels)


DEFAULTS = {"pos_margin": 0.0, "neg_margin": 1.0}


def search_space(trial) -> dict:
    pos_margin = trial.suggest_float("pos_margin", 0.0, 0.5)
    return {"pos_margin": pos_margin, "neg_margin": trial.suggest_float("neg_margin", 0.6, 1.6)}


register("contrastive", Contrastive, DEFAULTS, search_space, miner=None)
