"""Omniglot, bundled: 964 background classes for training (a class-disjoint tail held out for validation) and
the 659 evaluation classes as the retrieval test set, evaluated leave-one-out.

The .npz files hold `images` bool (classes, 20, 105, 105), True = background, and `labels` (classes, 20).
Everything is decoded once into a float tensor in memory (ink = 1.0), resized to `data.image_size`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from bench.config import DataConfig
from bench.data import DatasetBundle, DatasetError, EvalSplit, register_dataset
from bench.data.splits import carve_validation

FILES = {"train": "images_background.npz", "test": "images_evaluation.npz"}
EXPECTED_CLASSES = {"train": 964, "test": 659}
IMAGES_PER_CLASS = 20


class TensorImages(Dataset):
    """Images held in one float tensor (N, 1, S, S); optional light augmentation (random shifts) for
    training."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray, augment: bool = False) -> None:
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.augment:
            image = random_shift(image, max_shift=max(1, image.shape[-1] // 14))
        return image, int(self.labels[index])

    def subset(self, indices: np.ndarray, augment: bool | None = None) -> TensorImages:
        return TensorImages(
            self.images[torch.from_numpy(indices)],
            self.labels[indices],
            self.augment if augment is None else augment,
        )


def random_shift(image: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate by up to `max_shift` pixels with zero (background) fill; uses torch's global RNG (seeded per
    epoch)."""
    dy, dx = (torch.randint(-max_shift, max_shift + 1, (2,))).tolist()
    padded = F.pad(image, (max_shift, max_shift, max_shift, max_shift))
    side_y, side_x = image.shape[-2:]
    return padded[..., max_shift + dy : max_shift + dy + side_y, max_shift + dx : max_shift + dx + side_x]


def read_npz(path: Path, split: str, image_size: int) -> tuple[torch.Tensor, np.ndarray]:
    """Read one Omniglot .npz into (N, 1, S, S) float ink images and flat int64 labels, checking its shape."""
    if not path.is_file():
        raise DatasetError(
            f"Omniglot file missing: {path}. See datasets/omniglot/README.md (it ships with the repo)."
        )
    try:
        with np.load(path) as archive:
            images, labels = archive["images"], archive["labels"]
    except (OSError, KeyError, ValueError) as error:
        raise DatasetError(
            f"{path}: not a readable Omniglot archive with 'images' and 'labels': {error}"
        ) from error
    expected = (EXPECTED_CLASSES[split], IMAGES_PER_CLASS, 105, 105)
    if images.shape != expected or labels.shape != expected[:2]:
        raise DatasetError(
            f"{path}: images {images.shape} / labels {labels.shape}, expected {expected} / {expected[:2]}"
        )
    ink = torch.from_numpy(~images.reshape(-1, 1, 105, 105)).float()
    if image_size != 105:
        ink = F.interpolate(ink, size=(image_size, image_size), mode="area")
    return ink.contiguous(), labels.reshape(-1).astype(np.int64)


def content_hash(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@register_dataset("omniglot")
def load_omniglot(config: DataConfig, root: Path) -> DatasetBundle:
    train_images, train_labels = read_npz(root / FILES["train"], "train", config.image_size)
    test_images, test_labels = read_npz(root / FILES["test"], "test", config.image_size)
    background = TensorImages(train_images, train_labels)
    train_idx, val_idx = carve_validation(train_labels, config.val_fraction)
    train = background.subset(train_idx, augment=config.augment)
    val = EvalSplit("val", background.subset(val_idx, augment=False)) if len(val_idx) else None
    test = EvalSplit("test", TensorImages(test_images, test_labels))
    info = {
        "train_classes": len(np.unique(train.labels)),
        "train_images": len(train),
        "val_classes": len(np.unique(val.query.labels)) if val else 0,
        "val_images": len(val.query) if val else 0,
        "test_classes": len(np.unique(test_labels)),
        "test_images": len(test_labels),
        "content_hash": content_hash([root / FILES["train"], root / FILES["test"]]),
    }
    return DatasetBundle("omniglot", train, val, [test], info)
