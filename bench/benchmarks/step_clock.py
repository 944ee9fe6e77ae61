"""Timing training steps for `bench train`: each step's time split into its parts, and the peak memory
over a case's steps, with the step strategy itself left unchanged (see `bench.benchmarks.train_bench`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pandas as pd

PARTS = ("data_s", "to_device_s", "forward_s", "loss_s", "backward_s", "optimizer_s")


class StepClock:
    """Splits a training step's time by hooks on the model, the loss and the optimizer, so the step strategy
    itself is timed unchanged; on CUDA each boundary synchronises the device."""

    def __init__(self, trainer, device) -> None:
        import torch

        self.sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        self.totals: dict[str, float] = {}
        self.started: dict[str, float] = {}
        self.first_forward: float | None = None
        model, loss_fn, optimizer = trainer.forward_model, trainer.loss_fn, trainer.optimizer
        self.handles = [
            model.register_forward_pre_hook(lambda *_: self._start("forward_s")),
            model.register_forward_hook(lambda *_: self._stop("forward_s")),
            loss_fn.register_forward_pre_hook(lambda *_: self._start("loss_s")),
            loss_fn.register_forward_hook(lambda *_: self._stop("loss_s")),
            optimizer.register_step_pre_hook(lambda *_: self._start("optimizer_s")),
            optimizer.register_step_post_hook(lambda *_: self._stop("optimizer_s")),
        ]

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def _start(self, part: str) -> None:
        self.started[part] = self.now()
        if part == "forward_s" and self.first_forward is None:
            self.first_forward = self.started[part]

    def _stop(self, part: str) -> None:
        self.totals[part] = self.totals.get(part, 0.0) + self.now() - self.started.pop(part)

    def step(self, trainer, batches: Iterator) -> dict[str, float]:
        """One step on the next batch: seconds per part, summing to the step's time."""
        self.totals, self.first_forward = {}, None
        start = self.now()
        images, labels = next(batches)
        loaded = self.now()
        trainer.step(trainer, images, labels)
        end = self.now()
        parts = {"data_s": loaded - start, "to_device_s": (self.first_forward or end) - loaded, **self.totals}
        parts["backward_s"] = end - start - sum(parts.values())
        return {part: parts.get(part, 0.0) for part in PARTS}

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def time_steps(
    trainer, epoch_batches: Callable[[int], Iterator], warmup: int, steps: int
) -> tuple[pd.DataFrame, int]:
    """`warmup` untimed steps on the batches of epoch 0, then `steps` timed ones on epoch 1's: their split,
    and the peak memory in bytes over all of them (from before the first, which allocates the most)."""
    import resource

    import torch

    dev = trainer.device
    clock = StepClock(trainer, dev)
    cuda = dev.type == "cuda"
    if cuda:
        held = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    if warmup:
        batches = epoch_batches(0)
        for _ in range(warmup):
            clock.step(trainer, batches)
        del batches  # its loader workers stop before the timed epoch's start
    batches = epoch_batches(1)
    timed = pd.DataFrame([clock.step(trainer, batches) for _ in range(steps)])
    if cuda:
        peak = torch.cuda.max_memory_allocated(dev) - held
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
    clock.close()
    return timed, peak
