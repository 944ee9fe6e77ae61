"""Step strategies: what one batch does to the model. The trainer calls whichever it was given.

`PlainStep` embeds the whole batch with a graph. `CachedStep` is gradient caching (Gao et al., 2021, "Scaling
Deep Contrastive Learning Batch Size under Memory Limited Setup"): it embeds the batch in chunks without a
graph, computes the loss and dL/dE on the whole batch, then re-embeds each chunk with a graph, its random
state from the first pass restored, and backpropagates that chunk's rows of dL/dE. Peak activation memory is
one chunk's, for a second forward pass. With frozen BatchNorm the gradient is the plain step's (to rounding);
BatchNorm in training mode normalises each chunk by its own statistics, so start-up warns. Its running
statistics are those of the first pass only: the replay would update them a second time with the same
chunks. On the device the batch is held once, in its plain layout; each chunk goes to channels_last
(`train.channels_last`) as it is embedded, so no second full-batch copy exists.

Both take the loss through `compute_loss`, which adds the global batch under torchrun
(`bench.train.distributed`) and the cross-batch memory (`bench.train.memory`), so the three compose.
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from bench.train.distributed import counted_queries, scale_gradient
from bench.train.trainer import NonFiniteLossError, StepResult

if TYPE_CHECKING:
    from bench.train.trainer import Trainer


@dataclass
class LossTerms:
    """One process's part of a step's loss."""

    backward: Tensor  # what this process backpropagates
    value: float  # the loss of the whole (global) batch
    grad_scale: float  # this process's dL/dE comes out as grad_scale times the global batch's


def compute_loss(trainer: Trainer, embeddings: Tensor, labels: Tensor) -> LossTerms:
    """The loss of this step's embeddings: of the batch alone, or of its queries against the batch and the
    cross-batch memory; under torchrun, of the global batch (see `bench.train.distributed`)."""
    loss_fn, dist, memory = trainer.loss_fn, trainer.dist, trainer.memory
    batch, batch_labels = embeddings, labels
    splits, offset = False, 0
    if dist is not None:
        splits = getattr(loss_fn, "splits_by_query", False)
        if not splits:  # every rank backpropagates the global loss into its own block only
            embeddings = scale_gradient(embeddings, dist.world_size)
        batch = dist.gather(embeddings, sum_back=splits)
        batch_labels = dist.gather(labels, sum_back=False)
        if splits:  # this rank's queries, against the global batch
            offset = dist.rank * labels.numel()
        else:  # the global loss, on every rank
            embeddings, labels = batch, batch_labels
        dist.share_random_state()
    use_memory = memory is not None and memory.active(trainer.global_step)
    items, item_labels = memory.with_batch(batch, batch_labels) if use_memory else (batch, batch_labels)
    if items is embeddings:  # the batch against itself: the square form
        loss = loss_fn(embeddings, labels)
    else:
        loss = loss_fn(embeddings, labels, items, item_labels, query_offset=offset)
    if use_memory:
        memory.push(batch, batch_labels)
    if dist is None:
        return LossTerms(loss, float(loss.detach()), 1.0)
    if not splits:
        return LossTerms(loss, float(loss.detach()), float(dist.world_size))
    # split: each rank's loss is a mean over its own counted queries; weighed by its share of them, the
    # ranks' losses sum to the global loss, and the summed-back gradients to N times its gradient
    counted = counted_queries(labels, item_labels)
    total = dist.total_count(counted)
    if not total:  # no query anywhere has a positive: every rank's loss is a zero
        return LossTerms(loss, 0.0, float(dist.world_size))
    value = float(dist.sum(loss.detach() * counted)) / total
    return LossTerms(scale_gradient(loss, dist.world_size * counted / total), value, float(dist.world_size))


def global_grad_norm(trainer: Trainer, grad: Tensor | None, terms: LossTerms) -> float:
    """The norm of dL/dE over the whole (global) batch, from this process's rows."""
    if grad is None:
        return 0.0
    if trainer.dist is None:
        return float(grad.norm())
    return float(trainer.dist.sum(grad.double().pow(2).sum()).sqrt()) / terms.grad_scale


class PlainStep:
    """Embed the whole batch with a graph, compute the loss, backpropagate, update."""

    def __call__(self, trainer: Trainer, images: torch.Tensor, labels: torch.Tensor) -> StepResult:
        images, labels = to_device(trainer, images, labels)
        with autocast(trainer):
            embeddings = trainer.forward_model(images)
        embeddings.retain_grad()
        terms = compute_loss(trainer, embeddings.float(), labels)
        check_finite(terms.value, trainer)
        trainer.optimizer.zero_grad(set_to_none=True)
        terms.backward.backward()
        update(trainer)
        return StepResult(
            terms.value, global_grad_norm(trainer, embeddings.grad, terms), images_seen(trainer, labels)
        )


class CachedStep:
    """Gradient caching: chunks of `chunk_size` embedded without a graph, loss and dL/dE on the whole batch,
    then each chunk re-embedded with a graph (random state restored) and backpropagated from its rows."""

    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size

    def __call__(self, trainer: Trainer, images: torch.Tensor, labels: torch.Tensor) -> StepResult:
        images, labels = to_device(trainer, images, labels, whole_batch_layout=False)
        chunks = images.split(self.chunk_size)
        states, parts = [], []
        with torch.no_grad():
            for chunk in chunks:
                states.append(random_state(trainer.device))
                with autocast(trainer):
                    parts.append(trainer.forward_model(in_layout(trainer, chunk)).float())
        first_pass_stats = batchnorm_statistics(trainer.model)
        embeddings = torch.cat(parts).requires_grad_(True)
        terms = compute_loss(trainer, embeddings, labels)
        check_finite(terms.value, trainer)
        trainer.optimizer.zero_grad(set_to_none=True)
        terms.backward.backward()
        after_loss = random_state(trainer.device)
        grad = embeddings.grad if embeddings.grad is not None else torch.zeros_like(embeddings)
        chunk_grads = grad.split(self.chunk_size)
        for index, (chunk, state, chunk_grad) in enumerate(zip(chunks, states, chunk_grads, strict=True)):
            set_random_state(trainer.device, state)
            with gradient_sync(trainer, last=index == len(chunks) - 1):
                with autocast(trainer):
                    replayed = trainer.forward_model(in_layout(trainer, chunk))
                replayed.float().backward(chunk_grad)
        set_random_state(trainer.device, after_loss)
        restore_batchnorm_statistics(trainer.model, first_pass_stats)
        update(trainer)
        return StepResult(
            terms.value, global_grad_norm(trainer, embeddings.grad, terms), images_seen(trainer, labels)
        )


def to_device(
    trainer: Trainer, images: Tensor, labels: Tensor, whole_batch_layout: bool = True
) -> tuple[Tensor, Tensor]:
    """The batch on the trainer's device; an EncodedBatch (`data.decode: gpu`) is decoded and augmented there
    by its `.to` (`bench.data.device_decode`). With `whole_batch_layout` the images are in the model's memory
    layout (`in_layout`), a host tensor copied straight into it; else the caller lays out each chunk."""
    dev = trainer.device
    labels = labels.to(dev, non_blocking=True)
    if whole_batch_layout and isinstance(images, Tensor) and channels_last(trainer):
        return images.to(dev, non_blocking=True, memory_format=torch.channels_last), labels
    images = images.to(dev, non_blocking=True)
    return (in_layout(trainer, images) if whole_batch_layout else images), labels


def channels_last(trainer: Trainer) -> bool:
    return trainer.device.type == "cuda" and trainer.exp.train.channels_last


def in_layout(trainer: Trainer, images: Tensor) -> Tensor:
    """`images` in the model's memory layout: channels_last on CUDA with `train.channels_last`."""
    return images.contiguous(memory_format=torch.channels_last) if channels_last(trainer) else images


def batchnorm_statistics(model: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """(buffer, copy) for each running statistic a forward pass in training mode would update."""
    saved = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            buffers = (module.running_mean, module.running_var, module.num_batches_tracked)
            saved += [(buffer, buffer.clone()) for buffer in buffers if buffer is not None]
    return saved


def restore_batchnorm_statistics(model: nn.Module, saved: list[tuple[Tensor, Tensor]]) -> None:
    for buffer, copy in saved:
        buffer.copy_(copy)


def autocast(trainer: Trainer) -> torch.autocast:
    dev = trainer.device
    return torch.autocast(
        dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda" and trainer.exp.train.amp
    )


def gradient_sync(trainer: Trainer, last: bool):
    """DDP all-reduces the gradients once, on the last chunk's backward; the others accumulate locally."""
    network = trainer.network
    if last or not isinstance(network, nn.parallel.DistributedDataParallel):
        return nullcontext()
    return network.no_sync()


def update(trainer: Trainer) -> None:
    if trainer.exp.train.grad_clip:
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), trainer.exp.train.grad_clip)
    trainer.optimizer.step()


def images_seen(trainer: Trainer, labels: Tensor) -> int:
    """Images of the global batch (each rank embeds its share)."""
    return labels.numel() * (trainer.dist.world_size if trainer.dist is not None else 1)


def random_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The generators a forward pass may draw from (dropout, augmentation on the device)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_random_state(device: torch.device, state: tuple[Tensor, Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def warn_if_chunks_change_batchnorm(model: nn.Module, chunk_size: int | None) -> None:
    """Gradient caching with BatchNorm in training mode normalises each chunk by its own statistics: not
    the plain step's gradient. Frozen BatchNorm (`model.freeze_bn`) is exact."""
    batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if chunk_size and batchnorms and not getattr(model, "freeze_bn", False):
        warnings.warn(
            f"train.chunk_size={chunk_size} with BatchNorm in training mode: each chunk is normalised by its "
            "own statistics, so the gradient differs from the unchunked step's; set model.freeze_bn=true "
            "(the paper's recipe) for the exact gradient",
            stacklevel=2,
        )


def check_finite(value: float, trainer: Trainer) -> None:
    """Stop a diverging run at the step it diverges, saying where and what to change."""
    if not math.isfinite(value):
        exp = trainer.exp
        raise NonFiniteLossError(
            f"loss {exp.loss.name} became {value} at epoch {trainer.epoch + 1}, batch {trainer.batch + 1}; "
            f"lower optim.lr (now {exp.optim.lr}) or check the loss parameters {exp.loss.params}"
        )
