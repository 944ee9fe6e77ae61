"""Multi-Similarity loss with its MultiSimilarityMiner (pytorch-metric-learning; Wang et al., CVPR 2019)."""

from __future__ import annotations

from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners

from losses import register
from losses._pml import PMLLoss


class MultiSimilarity(PMLLoss):
    """MS loss on the pairs the MS miner keeps (those within `epsilon` of the hardest opposite pair)."""

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5, epsilon: float = 0.1):
        super().__init__(
            pml_losses.MultiSimilarityLoss(alpha=alpha, beta=beta, base=base),
            pml_miners.MultiSimilarityMiner(epsilon=epsilon),
        )


def search_space(trial) -> dict:
    return {
        "alpha": trial.suggest_float("alpha", 0.5, 10.0, log=True),
        "beta": trial.suggest_float("beta", 10.0, 80.0, log=True),
        "base": trial.suggest_float("base", 0.0, 1.0),
        "epsilon": trial.suggest_float("epsilon", 0.01, 0.3, log=True),
    }


register("multi_similarity", MultiSimilarity, search_space, miner="MultiSimilarityMiner")
