"""P x K class-balanced batch sampler.

Definitions (docs/training.md repeats them):
- A batch holds P = batch_size / K distinct classes and K images of each.
- An epoch is `len(labels) // batch_size` batches, so it shows about as many images as the split holds.
- Classes are visited in a random order, reshuffled whenever all have been visited, so every eligible class
  appears about equally often. Within a class, images are drawn without replacement from a shuffled pool;
  when fewer than K remain, the pool is reshuffled whole.
- A class with fewer than K images (but at least 2) contributes all its images, topped up to K with
  repeats drawn at random from them. A class with a single image can form no positive pair and is never
  sampled. Batches always hold at least two classes.
- The order depends only on (seed, epoch): `set_epoch` makes a resumed run draw exactly the same batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
from torch.utils.data import Sampler


class PKSampler(Sampler[list[int]]):
    def __init__(self, labels: np.ndarray, batch_size: int, samples_per_class: int, seed: int = 0) -> None:
        labels = np.asarray(labels)
        if samples_per_class < 1:
            raise ValueError(f"data.samples_per_class must be >= 1, got {samples_per_class}")
        if batch_size % samples_per_class:
            raise ValueError(
                f"data.batch_size={batch_size} must be a multiple of "
                f"data.samples_per_class={samples_per_class}"
            )
        self.classes_per_batch = batch_size // samples_per_class
        if self.classes_per_batch < 2:
            raise ValueError(
                f"data.batch_size={batch_size} with samples_per_class={samples_per_class} "
                "gives one class per batch; a batch needs at least two classes"
            )
        classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        order = np.argsort(inverse, kind="stable")
        groups = np.split(order, np.cumsum(counts)[:-1])
        self.pools = [g for g in groups if len(g) >= 2]
        self.dropped_classes = int(sum(len(g) < 2 for g in groups))
        if len(self.pools) < self.classes_per_batch:
            raise ValueError(
                f"{len(self.pools)} classes have at least 2 images, fewer than the {self.classes_per_batch} "
                f"classes per batch (data.batch_size / data.samples_per_class)"
            )
        self.batch_size = batch_size
        self.samples_per_class = samples_per_class
        self.num_batches = max(1, len(labels) // batch_size)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        k = self.samples_per_class
        pools = [rng.permutation(p) for p in self.pools]
        cursors = [0] * len(pools)
        class_order: list[int] = []
        for _ in range(self.num_batches):
            if len(class_order) < self.classes_per_batch:
                # a fresh permutation, its first entries chosen to differ from the leftover classes, so that
                # no class appears twice in one batch across the reshuffle
                leftover = set(class_order)
                perm = rng.permutation(len(pools)).tolist()
                class_order += [c for c in perm if c not in leftover] + [c for c in perm if c in leftover]
            chosen, class_order = class_order[: self.classes_per_batch], class_order[self.classes_per_batch :]
            batch: list[int] = []
            for c in chosen:
                pool = pools[c]
                if len(pool) < k:
                    batch.extend(pool.tolist())
                    batch.extend(rng.choice(pool, size=k - len(pool), replace=True).tolist())
                    continue
                if cursors[c] + k > len(pool):
                    pools[c] = pool = rng.permutation(pool)
                    cursors[c] = 0
                batch.extend(pool[cursors[c] : cursors[c] + k].tolist())
                cursors[c] += k
            yield batch


class RankShare(Sampler[list]):
    """One process's share of each global P x K batch of `sampler`, under torchrun: rank r of N takes the
    r-th run of P / N whole classes (the batch lists its classes' K images together), so every rank's share
    is class-complete and the shares, in rank order, are the global batch. `batches` is the stream to share
    out when it is not the sampler's own: its batches paired with per-image augmentation seeds
    (`bench.data.seeding`), so each image is augmented as in a single process."""

    def __init__(
        self, sampler: PKSampler, rank: int, world_size: int, batches: Iterable[list] | None = None
    ) -> None:
        if sampler.classes_per_batch % world_size:
            raise ValueError(
                f"data.batch_size / data.samples_per_class = {sampler.classes_per_batch} classes per batch "
                f"cannot be split by whole classes over {world_size} processes; make it a multiple of "
                f"{world_size}"
            )
        self.sampler, self.rank = sampler, rank
        self.batches = sampler if batches is None else batches
        self.share = sampler.batch_size // world_size

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list]:
        start = self.rank * self.share
        for batch in self.batches:
            yield batch[start : start + self.share]
