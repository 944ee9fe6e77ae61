"""Triplet margin loss (pytorch-metric-learning) with the miner chosen by a parameter.

`miner` is one of "all", "hard", "semihard", "easy" (PML's TripletMarginMiner with the loss's own margin)
or "batch_hard" (PML's BatchHardMiner: hardest positive and negative per anchor).
"""

from __future__ import annotations

from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners

from losses import register
from losses._pml import PMLLoss

MINERS = ("all", "hard", "semihard", "easy", "batch_hard")


class Triplet(PMLLoss):
    """Triplet margin loss on (anchor, positive, negative) triplets picked by the chosen miner."""

    def __init__(self, margin: float = 0.1, miner: str = "semihard"):
        if miner not in MINERS:
            raise ValueError(f"triplet: miner must be one of {', '.join(MINERS)}, got {miner!r}")
        if miner == "batch_hard":
            triplet_miner = pml_miners.BatchHardMiner()
        else:
            triplet_miner = pml_miners.TripletMarginMiner(margin=margin, type_of_triplets=miner)
        super().__init__(pml_losses.TripletMarginLoss(margin=margin), triplet_miner)


def search_space(trial) -> dict:
    return {
        "margin": trial.suggest_float("margin", 0.01, 0.5, log=True),
        "miner": trial.suggest_categorical("miner", ["all", "hard", "semihard", "batch_hard"]),
    }


register("triplet", Triplet, search_space, miner="TripletMarginMiner / BatchHardMiner (param `miner`)")
