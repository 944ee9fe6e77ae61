"""`smoothap-bench bench data --dataset NAME`: images per second through the training input pipeline
(PIL decode, train transforms, P x K batches, DataLoader workers, pinned memory when CUDA is present).

`synthetic_folder` writes a small `folder` dataset of random JPEGs, so the pipeline can be measured without
downloading anything.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from bench.config import DataConfig
from bench.data import load_dataset
from bench.data.samplers import PKSampler


def synthetic_folder(
    root: str | Path, classes: int = 16, per_class: int = 8, side: int = 256, seed: int = 0
) -> Path:
    """root/{train,test}/<class>/<n>.jpg with random-noise JPEGs of side x side (photo-sized decode cost)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for c in range(classes):
            folder = root / split / f"class_{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(per_class):
                pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{n:04d}.jpg", quality=90)
    return root


def bench_data(
    config: DataConfig, batches: int = 20, seed: int = 0, out: Callable[[str], None] | None = print
) -> dict:
    """Time `batches` training batches after one warm-up batch (which starts the workers)."""
    bundle = load_dataset(config)
    sampler = PKSampler(bundle.train.labels, config.batch_size, config.samples_per_class, seed=seed)
    pin = torch.cuda.is_available()
    loader = DataLoader(
        bundle.train,
        batch_sampler=sampler,
        num_workers=config.num_workers,
        pin_memory=pin,
        persistent_workers=config.num_workers > 0,
    )
    images, done, epoch, start = 0, 0, 0, None
    while done < batches:
        sampler.set_epoch(epoch)
        epoch += 1
        for batch, _ in loader:
            if start is None:  # the warm-up batch, which also starts the workers
                start = time.perf_counter()
                continue
            images += len(batch)
            done += 1
            if done == batches:
                break
    seconds = time.perf_counter() - start
    result = {
        "dataset": config.name,
        "images": images,
        "seconds": round(seconds, 3),
        "images_per_s": round(images / seconds, 1),
        "batch_size": config.batch_size,
        "image_size": config.image_size,
        "num_workers": config.num_workers,
        "pin_memory": pin,
    }
    if out is not None:
        out(
            f"{config.name}: {result['images_per_s']} images/s ({images} images in {result['seconds']} s; "
            f"batch {config.batch_size}, {config.image_size}px, {config.num_workers} workers, "
            f"pin_memory={pin})"
        )
    return result
