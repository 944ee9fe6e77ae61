"""Small real-data bundles for fast training tests: a few Omniglot classes, read from the bundled files."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from bench.data import DatasetBundle, EvalSplit
from bench.data.omniglot import FILES, TensorImages, read_npz

OMNIGLOT = Path(__file__).resolve().parent.parent / "datasets" / "omniglot"


@lru_cache(maxsize=4)
def _omniglot(split: str, image_size: int) -> TensorImages:
    images, labels = read_npz(OMNIGLOT / FILES[split], split, image_size)
    return TensorImages(images, labels)


def tiny_omniglot(train_classes: int = 12, val_classes: int = 6, test_classes: int = 10, image_size: int = 14,
                  per_class: int = 20) -> DatasetBundle:
    """Real Omniglot images, few classes: background classes for train/val, evaluation classes for test."""
    background, evaluation = _omniglot("train", image_size), _omniglot("test", image_size)

    def take(data: TensorImages, classes: range, augment: bool) -> TensorImages:
        keep = np.flatnonzero(np.isin(data.labels, list(classes)) & (np.arange(len(data.labels)) % 20 < per_class))
        return data.subset(keep, augment=augment)

    train = take(background, range(train_classes), True)
    val = take(background, range(train_classes, train_classes + val_classes), False)
    test = take(evaluation, range(test_classes), False)
    return DatasetBundle("omniglot", train, EvalSplit("val", val), [EvalSplit("test", test)],
                         {"content_hash": "tiny", "train_images": len(train)})
