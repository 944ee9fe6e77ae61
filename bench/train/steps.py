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

A step is built with its own settings (`StepSettings`, read from the config once) and its loss
(`bench.train.batch_loss.BatchLoss`, which composes the global batch under torchrun and the cross-batch
memory as strategies), so it reads nothing else of the run's config and either step composes with both.
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from bench.config import Experiment
from bench.train.batch_loss import BatchLoss, LossTerms
from bench.train.trainer import NonFiniteLossError, StepResult

if TYPE_CHECKING:
    from bench.train.trainer import Trainer


@dataclass(frozen=True)
class StepSettings:
    """What a step takes from the run's config, resolved for its device when the step is built."""

    device: torch.device
    amp: bool  # bf16 autocast: `train.amp`, on CUDA only
    channels_last: bool  # images in NHWC: `train.channels_last`
    grad_clip: float | None
    loss_name: str  # for a diverging run's message, with the two below
    lr: float
    loss_params: dict[str, Any]

    @classmethod
    def of(cls, exp: Experiment, device: torch.device) -> StepSettings:
        """The settings of `exp` on `device`: amp applies on CUDA only, as the config says."""
        cuda = device.type == "cuda"
        train = exp.train
        return cls(
            device,
            cuda and train.amp,
            train.channels_last,
            train.grad_clip,
            exp.loss.name,
            exp.optim.lr,
            exp.loss.params,
        )


def build_step(settings: StepSettings, loss: BatchLoss, chunk_size: int | None) -> PlainStep | CachedStep:
    """The gradient-cached step with `train.chunk_size`, else the plain one."""
    return CachedStep(settings, loss, chunk_size) if chunk_size else PlainStep(settings, loss)


class _Step:
    """What both steps share: their settings, their loss, and the parts of a step around the forward."""

    def __init__(self, settings: StepSettings, loss: BatchLoss) -> None:
        self.settings, self.loss = settings, loss

    def to_device(
        self, images: Tensor, labels: Tensor, whole_batch_layout: bool = True
    ) -> tuple[Tensor, Tensor]:
        """The batch on the step's device; an EncodedBatch (`data.decode: gpu`) is decoded and augmented
        there by its `.to` (`bench.data.device_decode`). With `whole_batch_layout` the images are in the
        model's memory layout (`in_layout`), a host tensor copied straight into it; else the caller lays out
        each chunk."""
        dev = self.settings.device
        labels = labels.to(dev, non_blocking=True)
        if whole_batch_layout and isinstance(images, Tensor) and self.settings.channels_last:
            return images.to(dev, non_blocking=True, memory_format=torch.channels_last), labels
        images = images.to(dev, non_blocking=True)
        return (self.in_layout(images) if whole_batch_layout else images), labels

    def in_layout(self, images: Tensor) -> Tensor:
        """`images` in the model's memory layout: channels_last with `train.channels_last`."""
        return images.contiguous(memory_format=torch.channels_last) if self.settings.channels_last else images

    def autocast(self) -> torch.autocast:
        dev = self.settings.device
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.settings.amp)

    def loss_terms(self, trainer: Trainer, embeddings: Tensor, labels: Tensor) -> LossTerms:
        """The step's loss terms, a diverging run stopped at the step it diverges."""
        terms = self.loss(embeddings, labels, trainer.global_step)
        check_finite(terms.value, self.settings, trainer)
        return terms

    def update(self, trainer: Trainer) -> None:
        if self.settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), self.settings.grad_clip)
        trainer.optimizer.step()

    def result(self, terms: LossTerms, grad: Tensor | None, labels: Tensor) -> StepResult:
        return StepResult(terms.value, self.loss.grad_norm(grad, terms), self.loss.images(labels))


class PlainStep(_Step):
    """Embed the whole batch with a graph, compute the loss, backpropagate, update."""

    def __call__(self, trainer: Trainer, images: torch.Tensor, labels: torch.Tensor) -> StepResult:
        images, labels = self.to_device(images, labels)
        with self.autocast():
            embeddings = trainer.forward_model(images)
        embeddings.retain_grad()
        terms = self.loss_terms(trainer, embeddings.float(), labels)
        trainer.optimizer.zero_grad(set_to_none=True)
        terms.backward.backward()
        self.update(trainer)
        return self.result(terms, embeddings.grad, labels)


class CachedStep(_Step):
    """Gradient caching: chunks of `chunk_size` embedded without a graph, loss and dL/dE on the whole batch,
    then each chunk re-embedded with a graph (random state restored) and backpropagated from its rows."""

    def __init__(self, settings: StepSettings, loss: BatchLoss, chunk_size: int) -> None:
        super().__init__(settings, loss)
        self.chunk_size = chunk_size

    def __call__(self, trainer: Trainer, images: torch.Tensor, labels: torch.Tensor) -> StepResult:
        dev = self.settings.device
        images, labels = self.to_device(images, labels, whole_batch_layout=False)
        chunks = images.split(self.chunk_size)
        states, parts = [], []
        with torch.no_grad():
            for chunk in chunks:
                states.append(random_state(dev))
                with self.autocast():
                    parts.append(trainer.forward_model(self.in_layout(chunk)).float())
        first_pass_stats = batchnorm_statistics(trainer.model)
        embeddings = torch.cat(parts).requires_grad_(True)
        terms = self.loss_terms(trainer, embeddings, labels)
        trainer.optimizer.zero_grad(set_to_none=True)
        terms.backward.backward()
        after_loss = random_state(dev)
        grad = embeddings.grad if embeddings.grad is not None else torch.zeros_like(embeddings)
        chunk_grads = grad.split(self.chunk_size)
        for index, (chunk, state, chunk_grad) in enumerate(zip(chunks, states, chunk_grads, strict=True)):
            set_random_state(dev, state)
            with gradient_sync(trainer, last=index == len(chunks) - 1):
                with self.autocast():
                    replayed = trainer.forward_model(self.in_layout(chunk))
                replayed.float().backward(chunk_grad)
        set_random_state(dev, after_loss)
        restore_batchnorm_statistics(trainer.model, first_pass_stats)
        self.update(trainer)
        return self.result(terms, embeddings.grad, labels)


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


def gradient_sync(trainer: Trainer, last: bool):
    """DDP all-reduces the gradients once, on the last chunk's backward; the others accumulate locally."""
    network = trainer.network
    if last or not isinstance(network, nn.parallel.DistributedDataParallel):
        return nullcontext()
    return network.no_sync()


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


def check_finite(value: float, settings: StepSettings, trainer: Trainer) -> None:
    """Stop a diverging run at the step it diverges, saying where and what to change."""
    if not math.isfinite(value):
        where = f"epoch {trainer.epoch + 1}, batch {trainer.batch + 1}"
        raise NonFiniteLossError(
            f"loss {settings.loss_name} became {value} at {where}; "
            f"lower optim.lr (now {settings.lr}) or check the loss parameters {settings.loss_params}"
        )
