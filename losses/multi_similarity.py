"""Multi-Similarity loss with its MultiSimilarityMiner (pytorch-metric-learning; Wang et al., CVPR 2019)."""

from __future__ import annotations

from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from torch import Tensor, nn

from losses import register
from losses._pml import pml_forward_similarities


class MultiSimilarity(nn.Module):
    """MS loss on the pairs the MS miner keeps (those within `epsilon` of the hardest opposite pair)."""

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5, epsilon: float = 0.1):
        super().__init__()
        self.loss = pml_losses.MultiSimilarityLoss(alpha=alpha, beta=beta, base=base)
        self.miner = pml_miners.MultiSimilarityMiner(epsilon=epsilon)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return self.loss(embeddings, labels, self.miner(embeddings, labels))

    def forward_similarities(self, sims: Tensor, labels: Tensor) -> Tensor:
        """The loss as a function of the similarity matrix, for losses.introspect."""
        return pml_forward_similarities(self, sims, labels)


DEFAULTS = {"alpha": 2.0, "beta": 50.0, "base": 0.5, "epsilon": 0.1}


def search_space(trial) -> dict:
    return {
        "alpha": trial.suggest_float("alpha", 0.5, 10.0, log=True),
        "beta": trial.suggest_float("beta", 10.0, 80.0, log=True),
        "base": trial.suggest_float("base", 0.0, 1.0),
        "epsilon": trial.suggest_float("epsilon", 0.01, 0.3, log=True),
    }


register("multi_similarity", MultiSimilarity, DEFAULTS, search_space, miner="MultiSimilarityMiner")
