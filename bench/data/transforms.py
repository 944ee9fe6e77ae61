"""Image transforms as in the Smooth-AP paper (and the metric-learning literature it follows).

Train: RandomResizedCrop(S) + horizontal flip. Test: Resize(256/224 * S) + CenterCrop(S), so that S=224 gives
the usual Resize(256) + CenterCrop(224). Both end in ImageNet normalisation, because the backbones are
ImageNet-pretrained. Geometric ops run on the PIL image (cheaper than on a decoded full-size tensor);
conversion to float comes last.

Each transform is two stages, geometry then conversion (see `stages`): with `data.decode: gpu` the device
path (`bench.data.device_decode`) runs the same geometry object per image on the device and the conversion
once on the stacked batch, so both paths draw the same crops from the same seeds.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from bench.config import DataConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_normalised_tensor() -> list[v2.Transform]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def _two_stages(geometry: list[v2.Transform]) -> v2.Compose:
    return v2.Compose([v2.Compose(geometry), v2.Compose(_to_normalised_tensor())])


def train_transform(image_size: int) -> v2.Compose:
    return _two_stages([v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()])


def resize_side(image_size: int) -> int:
    """Shorter side before the centre crop: 256 for 224, scaled proportionally for other sizes."""
    return round(image_size * 256 / 224)


def test_transform(image_size: int) -> v2.Compose:
    return _two_stages([v2.Resize(resize_side(image_size), antialias=True), v2.CenterCrop(image_size)])


def stages(transform: v2.Compose) -> tuple[v2.Compose, v2.Compose]:
    """(geometry, conversion to a normalised float tensor) of a transform made here; anything else fails
    naming it, since the device path cannot tell where its per-image part ends."""
    parts = getattr(transform, "transforms", None)
    if not (isinstance(parts, list) and len(parts) == 2 and all(isinstance(p, v2.Compose) for p in parts)):
        raise TypeError(
            f"data.decode: gpu runs the two-stage transforms of bench.data.transforms (geometry, then "
            f"conversion); got {transform!r}"
        )
    return parts[0], parts[1]


def make_transforms(config: DataConfig) -> tuple[v2.Compose, v2.Compose]:
    """(train, test) transforms; with `data.augment: false` training uses the deterministic test transform."""
    if config.image_size < 1:
        raise ValueError(f"data.image_size must be positive, got {config.image_size}")
    test = test_transform(config.image_size)
    return (train_transform(config.image_size) if config.augment else test), test
