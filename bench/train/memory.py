"""Cross-batch memory (Wang et al., "Cross-Batch Memory for Embedding Learning", CVPR 2020).

A first-in-first-out queue of the last `size` training embeddings (detached) and their labels. From step
`start_step` on, each step's loss ranks the batch's queries against the batch followed by the queue, oldest
item first, through the losses' queries x gallery form (`losses._refs`, the queries at offset 0); then the
batch joins the queue. Under torchrun the queue holds global batches, the same on every rank. Its contents
are part of the checkpoint, so a resumed run continues with the queue an uninterrupted run would have had.

Unlike the authors' code, the batch joins the queue after its loss, so no query meets a detached copy of
itself among the memory's items.
"""

from __future__ import annotations

import torch
from torch import Tensor


class CrossBatchMemory:
    """The last `size` embeddings and labels pushed, oldest first."""

    def __init__(self, size: int, start_step: int = 0) -> None:
        if size < 1:
            raise ValueError(f"loss.memory_size must be at least 1 for a memory, got {size}")
        self.size, self.start_step = size, start_step
        self.embeddings: Tensor | None = None
        self.labels: Tensor | None = None

    def active(self, step: int) -> bool:
        """Whether training step `step` (counted from 0 over the whole run) uses and fills the memory."""
        return step >= self.start_step

    def __len__(self) -> int:
        return 0 if self.labels is None else self.labels.numel()

    def push(self, embeddings: Tensor, labels: Tensor) -> None:
        """Append a batch, dropping the oldest items beyond `size`."""
        embeddings, labels = embeddings.detach(), labels.detach().reshape(-1)
        if self.embeddings is not None:
            embeddings = torch.cat([self.embeddings, embeddings.to(self.embeddings)])
            labels = torch.cat([self.labels, labels.to(self.labels.device)])
        self.embeddings, self.labels = embeddings[-self.size :], labels[-self.size :]

    def with_batch(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The retrieval set of a step: the batch (its queries at offset 0), then the memory."""
        if self.embeddings is None:
            return embeddings, labels
        items = torch.cat([embeddings, self.embeddings.to(embeddings)])
        return items, torch.cat([labels.reshape(-1), self.labels.to(labels.device)])

    def state_dict(self) -> dict[str, Tensor | None]:
        on_cpu = {"embeddings": self.embeddings, "labels": self.labels}
        return {key: None if value is None else value.cpu() for key, value in on_cpu.items()}

    def load_state_dict(self, state: dict[str, Tensor | None], device: torch.device) -> None:
        self.embeddings = None if state["embeddings"] is None else state["embeddings"].to(device)
        self.labels = None if state["labels"] is None else state["labels"].to(device)
