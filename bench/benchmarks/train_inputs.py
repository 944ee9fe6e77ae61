"""The inputs of `bench train`'s cases: one global batch held in memory, or synthetic photo-like JPEGs read
through the run's own loader (see `bench.benchmarks.train_bench`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np


def write_jpegs(folder: Path, count: int, side: int, seed: int = 0) -> list[Path]:
    """`count` photo-like JPEGs of side x 3/4 side at quality 90 (smooth colour fields with mild noise, about
    the file size of a photo of that size, so decoding costs about what a photo's does)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = side, max(1, side * 3 // 4)
    paths = []
    for n in range(count):
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
        pixels = (field + rng.integers(-8, 9, field.shape)).clip(0, 255).astype(np.uint8)
        paths.append(folder / f"{n:05d}.jpg")
        Image.fromarray(pixels).save(paths[-1], quality=90)
    return paths


def jpeg_bundle(folder: str, config, items: int):
    """A training set of `items` entries cycling over the folder's JPEGs, 2K entries per class, with the
    run's training transform."""
    from bench.data import DatasetBundle
    from bench.data.images import ImageList
    from bench.data.transforms import make_transforms

    files = sorted(Path(folder).glob("*.jpg"))
    per_class = 2 * config.samples_per_class
    paths = [files[i % len(files)] for i in range(items)]
    train = ImageList(paths, [i // per_class for i in range(items)], make_transforms(config)[0])
    return DatasetBundle("jpegs", train, None, [])


def memory_case(batch_size: int, samples_per_class: int, image_size: int):
    """The in-memory input: a bundle holding one random global batch, and that batch."""
    import torch

    from bench.data import DatasetBundle
    from bench.data.omniglot import TensorImages

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch_size, 3, image_size, image_size, generator=gen)
    labels = torch.arange(batch_size // samples_per_class).repeat_interleave(samples_per_class)
    return DatasetBundle("synthetic", TensorImages(images, labels.numpy()), None, []), (images, labels)


def loader_epoch(trainer, epoch: int) -> Iterator:
    """A fresh pass of the run's loader over `epoch`, seeded as the trainer seeds it: its workers start cold
    and fill up, as at the start of every epoch of a run (they are not persistent)."""
    from bench.train.trainer import seed_everything

    trainer.sampler.set_epoch(epoch)
    seed_everything(trainer.exp.train.seed * 100_003 + epoch)
    return iter(trainer.loader)
