"""FastAP (Cakir et al., CVPR 2019) from pytorch-metric-learning: AP by histogram binning of distances."""

from __future__ import annotations

from pytorch_metric_learning import losses as pml_losses

from losses import register
from losses._pml import PMLLoss


class FastAP(PMLLoss):
    """1 - FastAP with `num_bins` soft distance bins."""

    def __init__(self, num_bins: int = 10):
        if num_bins < 2:
            raise ValueError(f"fastap: num_bins must be >= 2, got {num_bins}")
        super().__init__(pml_losses.FastAPLoss(num_bins=int(num_bins)))


def search_space(trial) -> dict:
    return {"num_bins": trial.suggest_int("num_bins", 5, 50, log=True)}


register("fastap", FastAP, search_space)
