"""The queries x gallery form every loss accepts: `loss(embeddings, labels, ref_embeddings, ref_labels,
query_offset)`.

Rows are the queries (`embeddings`, `labels`), columns the retrieval set (`ref_embeddings`, `ref_labels`). The
retrieval set holds the queries themselves at rows `query_offset .. query_offset + B - 1`, so each query's own
column is known and left out of its ranking, as in the square form. Where they sit depends on the caller:
under torchrun the local queries are the rank's block of the gathered global batch; with a cross-batch
memory the batch comes first, the memory after it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_refs(
    name: str,
    embeddings: Tensor,
    labels: Tensor,
    ref_embeddings: Tensor,
    ref_labels: Tensor | None,
    offset: int,
) -> tuple[Tensor, Tensor]:
    """The labels and ref labels as flat tensors on the embeddings' device; a ValueError naming the loss when
    the shapes disagree or the ref items do not hold the queries at `offset`."""
    if ref_labels is None:
        raise ValueError(f"{name}: ref_embeddings needs ref_labels")
    labels = labels.reshape(-1).to(embeddings.device)
    ref_labels = ref_labels.reshape(-1).to(embeddings.device)
    batch, size = labels.numel(), ref_labels.numel()
    if (
        embeddings.dim() != 2
        or ref_embeddings.dim() != 2
        or embeddings.shape != (batch, ref_embeddings.shape[1])
        or ref_embeddings.shape[0] != size
    ):
        raise ValueError(
            f"{name}: expected embeddings [B, D], labels [B], ref_embeddings [M, D], ref_labels [M]; got "
            f"{tuple(embeddings.shape)}, {tuple(labels.shape)}, {tuple(ref_embeddings.shape)}, {size}"
        )
    if not 0 <= offset <= size - batch:
        raise ValueError(
            f"{name}: query_offset {offset} puts the {batch} queries outside the {size} ref items"
        )
    if not torch.equal(ref_labels[offset : offset + batch], labels):
        raise ValueError(
            f"{name}: ref_labels[{offset}:{offset + batch}] differ from the queries' labels; the ref items "
            "must hold the queries themselves at query_offset"
        )
    return labels, ref_labels


def own_columns(batch: int, size: int, offset: int, device: torch.device) -> Tensor:
    """is_self[q, j]: whether ref item j is query q itself (j == offset + q), as a B x M mask."""
    is_self = torch.zeros(batch, size, dtype=torch.bool, device=device)
    rows = torch.arange(batch, device=device)
    is_self[rows, rows + offset] = True
    return is_self
