"""Embed evaluation splits and score them by the dataset's protocol (leave-one-out or query -> gallery)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from bench.clustering import clustering_metrics
from bench.config import EvalConfig
from bench.data import EvalSplit, LabeledDataset
from bench.metrics import retrieval_metrics


@torch.no_grad()
def embed(
    model: torch.nn.Module,
    dataset: LabeledDataset,
    device: torch.device,
    batch_size: int = 512,
    num_workers: int = 0,
    channels_last: bool = False,
) -> np.ndarray:
    """Embeddings of every item, in item order, as float32 (N, D)."""
    was_training = model.training
    model.eval()
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    chunks = []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for images, _ in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast:
            chunks.append(model(images).float().cpu())
    model.train(was_training)
    return torch.cat(chunks).numpy()


def evaluate_split(
    model: torch.nn.Module,
    split: EvalSplit,
    config: EvalConfig,
    device: torch.device,
    num_workers: int = 0,
    channels_last: bool = False,
    clustering: bool | None = None,
) -> dict[str, float]:
    """Metrics of one split, keyed `<split>/<metric>` (for example `test/recall_at_1`).

    Clustering metrics (`nmi`, `ami`, `f1` of seeded k-means with as many clusters as classes) cost a k-means,
    so by default they are computed on test splits only (`test`, `test_small`, ...), never at validation.
    Under a query/gallery protocol the query set is clustered (the gallery is only searched).
    """
    ks = tuple(config.ks) if config.ks else split.ks
    query = embed(model, split.query, device, config.batch_size, num_workers, channels_last)
    gallery = None
    gallery_labels = None
    if split.gallery is not None:
        gallery = embed(model, split.gallery, device, config.batch_size, num_workers, channels_last)
        gallery_labels = split.gallery.labels
    metrics = retrieval_metrics(
        query, split.query.labels, gallery, gallery_labels, ks=ks, backend=config.backend
    )
    if clustering is None:
        clustering = split.name.startswith("test")
    if clustering:
        metrics.update(clustering_metrics(query, split.query.labels))
    return {f"{split.name}/{key}": float(value) for key, value in metrics.items()}
