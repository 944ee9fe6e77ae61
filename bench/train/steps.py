"""Step strategies: what one batch does to the model. The trainer calls whichever it was given."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from bench.train.trainer import NonFiniteLossError, StepResult

if TYPE_CHECKING:
    from bench.train.trainer import Trainer


class PlainStep:
    """Embed the whole batch with a graph, compute the loss, backpropagate, update."""

    def __call__(self, trainer: Trainer, images: torch.Tensor, labels: torch.Tensor) -> StepResult:
        exp, dev = trainer.exp, trainer.device
        images = images.to(dev, non_blocking=True)
        labels = labels.to(dev, non_blocking=True)
        if dev.type == "cuda" and exp.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda" and exp.train.amp):
            embeddings = trainer.model(images)
        embeddings.retain_grad()
        loss = trainer.loss_fn(embeddings.float(), labels)
        value = float(loss.detach())
        check_finite(value, trainer)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if exp.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), exp.train.grad_clip)
        trainer.optimizer.step()
        grad_norm = float(embeddings.grad.norm()) if embeddings.grad is not None else 0.0
        return StepResult(value, grad_norm, len(labels))


def check_finite(value: float, trainer: Trainer) -> None:
    """Stop a diverging run at the step it diverges, saying where and what to change."""
    if not math.isfinite(value):
        exp = trainer.exp
        raise NonFiniteLossError(
            f"loss {exp.loss.name} became {value} at epoch {trainer.epoch + 1}, batch {trainer.batch + 1}; "
            f"lower optim.lr (now {exp.optim.lr}) or check the loss parameters {exp.loss.params}"
        )
