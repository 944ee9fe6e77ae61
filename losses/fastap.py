"""FastAP (Cakir et al., CVPR 2019) from pytorch-metric-learning: AP by histogram binning of distances."""

from __future__ import annotations

from pytorch_metric_learning import losses as pml_losses
from torch import Tensor, nn

from losses import register
from losses._pml import pml_forward_similarities


class FastAP(nn.Module):
    """1 - FastAP with `num_bins` soft distance bins."""

    def __init__(self, num_bins: int = 10):
        super().__init__()
        if num_bins < 2:
            raise ValueError(f"fastap: num_bins must be >= 2, got {num_bins}")
        self.loss = pml_losses.FastAPLoss(num_bins=int(num_bins))

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return self.loss(embeddings, labels)

    def forward_similarities(self, sims: Tensor, labels: Tensor) -> Tensor:
        """The loss as a function of the similarity matrix, for losses.introspect."""
        return pml_forward_similarities(self, sims, labels)


DEFAULTS = {"num_bins": 10}


def search_space(trial) -> dict:
    return {"num_bins": trial.suggest_int("num_bins", 5, 50, log=True)}


register("fastap", FastAP, DEFAULTS, search_space, miner=None)
