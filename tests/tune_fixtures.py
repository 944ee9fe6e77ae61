"""Tiny data and configs for the tuning and ablation tests, and a tuning worker to run as a separate process.

The bundle is synthetic on purpose: each class is a fixed random ink pattern plus per-image noise, so a model can
learn it in a few batches, and building it costs milliseconds (the real Omniglot reader reads 32k images).

Worker use, from the repository root (what the SIGKILL and two-worker tests start):
    python -m tests.tune_fixtures STORAGE CHECKPOINT_DIR TRIALS EPOCHS
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from bench.config import Experiment, load_experiment
from bench.data import DatasetBundle, EvalSplit
from bench.data.omniglot import TensorImages


def tiny_bundle(
    train_classes: int = 8,
    val_classes: int = 4,
    test_classes: int = 4,
    per_class: int = 6,
    size: int = 8,
    seed: int = 0,
) -> DatasetBundle:
    """Class-disjoint train / val / test splits of synthetic 1-channel images."""
    generator = torch.Generator().manual_seed(seed)
    total = train_classes + val_classes + test_classes
    prototypes = (torch.rand(total, 1, size, size, generator=generator) > 0.7).float()
    images = prototypes.repeat_interleave(per_class, 0)
    images = (images + 0.3 * torch.randn(images.shape, generator=generator)).clamp(0, 1)
    labels = np.repeat(np.arange(total), per_class).astype(np.int64)
    everything = TensorImages(images, labels)
    cut_val, cut_test = train_classes * per_class, (train_classes + val_classes) * per_class
    train = everything.subset(np.arange(cut_val), augment=False)
    val = everything.subset(np.arange(cut_val, cut_test), augment=False)
    test = everything.subset(np.arange(cut_test, len(labels)), augment=False)
    info = {"train_classes": train_classes, "val_classes": val_classes, "test_classes": test_classes}
    return DatasetBundle("tiny", train, EvalSplit("val", val), [EvalSplit("test", test)], info)


def tiny_experiment(
    workdir: Path, trials: int = 3, epochs: int = 2, extra: list[str] | None = None
) -> Experiment:
    """The bundled Omniglot config shrunk to seconds: 8 px, batches of 4 classes x 4 images, 16-d embeddings."""
    return load_experiment(
        "omniglot",
        [
            "data.image_size=8",
            "data.batch_size=16",
            "data.samples_per_class=4",
            "data.augment=false",
            "model.embedding_dim=16",
            f"train.epochs={epochs}",
            f"train.checkpoint_dir={workdir / 'checkpoints'}",
            f"tune.trials={trials}",
            "tune.epochs=null",  # trials and final runs train for train.epochs, whatever the bundled config says
            "tune.final_epochs=null",
            f"tune.storage=sqlite:///{workdir / 'optuna.db'}",
            "eval.batch_size=64",
            "optim.lr_decay_epochs=[]",
            *(extra or []),
        ],
    )


def tune_worker(storage: str, checkpoints: Path, trials: int, epochs: int) -> None:
    """One tuning worker on the `contrastive` study, with heartbeats fast enough for a test to see a dead one."""
    from bench.tune import tune_losses

    exp = tiny_experiment(checkpoints, trials=trials, epochs=epochs, extra=["tune.pruner=none"])
    tune_losses(
        exp,
        ["contrastive"],
        storage=storage,
        device="cpu",
        bundle=tiny_bundle(),
        heartbeat_interval=1,
        grace_period=3,
        poll_s=0.5,
    )


def _main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    tune_worker(argv[0], Path(argv[1]), int(argv[2]), int(argv[3]))


if __name__ == "__main__":
    _main(sys.argv[1:])
