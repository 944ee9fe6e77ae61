"""Per-sample augmentation seeds, so that a batch is the same whichever process loads it.

Augmentations draw from torch's global RNG. Without DataLoader workers that is the main process's RNG, with
workers each worker's own: the same seed would give other augmentations with `data.num_workers` > 0. Here
the batch sampler's indices are paired with a seed per sample, drawn once per epoch in the main process (after
the trainer has seeded it from (seed, epoch)), and each sample is loaded under its own seed in a forked RNG.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


class SeededBatches:
    """Wraps a batch sampler: yields [(index, seed), ...] with one augmentation seed per sample."""

    def __init__(self, batch_sampler: Iterable[list[int]]) -> None:
        self.batch_sampler = batch_sampler

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch_seed = int(torch.randint(0, 2**62, (1,)).item())  # one draw from the trainer-seeded main RNG
        position = 0
        for batch in self.batch_sampler:
            seeds = np.random.SeedSequence([epoch_seed, position]).generate_state(len(batch), dtype=np.uint64)
            yield [(int(index), int(seed) % 2**63) for index, seed in zip(batch, seeds, strict=True)]
            position += 1


class SeededSamples(Dataset):
    """Wraps a dataset: item (index, seed) is `dataset[index]` loaded with torch's RNG seeded by `seed`."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also queues CUDA's
            return self.dataset[index]
