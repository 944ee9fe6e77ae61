"""Embed evaluation splits and score them by the dataset's protocol (leave-one-out, query -> gallery, or
the mean over several query/gallery draws of one embedded set).

On a CUDA device the embeddings stay on the GPU, so the search runs there too: faiss's GPU index with
faiss-gpu installed, else the chunked torch search (see bench.metrics.search_engine).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader

from bench.clustering import clustering_metrics
from bench.config import EvalConfig
from bench.data import Draw, EvalSplit, LabeledDataset
from bench.data.device_decode import loader_source
from bench.metrics import Backend, retrieval_metrics

DRAW_STD = "_draw_std"  # `<split>_draw_std/<metric>`: not under `<split>/`, which reports read as metrics


@torch.no_grad()
def embed_tensor(
    model: torch.nn.Module,
    dataset: LabeledDataset,
    device: torch.device,
    batch_size: int = 512,
    num_workers: int = 0,
    channels_last: bool = False,
    amp: bool = True,
) -> torch.Tensor:
    """Embeddings of every item, in item order, as float32 (N, D) left on `device` for the search; the model
    runs under bf16 autocast on CUDA when `amp` (`train.amp`, as in training), else in fp32."""
    was_training = model.training
    model.eval()
    loader = DataLoader(
        **loader_source(dataset),  # data.decode: gpu hands over file bytes, decoded on the device
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    chunks = []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and amp)
    for images, _ in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast:
            chunks.append(model(images).float())
    model.train(was_training)
    return torch.cat(chunks)


def embed(
    model: torch.nn.Module,
    dataset: LabeledDataset,
    device: torch.device,
    batch_size: int = 512,
    num_workers: int = 0,
    channels_last: bool = False,
) -> np.ndarray:
    """`embed_tensor` as a numpy array on the CPU."""
    return embed_tensor(model, dataset, device, batch_size, num_workers, channels_last).cpu().numpy()


def evaluate_split(
    model: torch.nn.Module,
    split: EvalSplit,
    config: EvalConfig,
    device: torch.device,
    num_workers: int = 0,
    channels_last: bool = False,
    clustering: bool | None = None,
    amp: bool = True,
) -> dict[str, float]:
    """Metrics of one split, keyed `<split>/<metric>` (for example `test/recall_at_1`).

    A split with `draws` reports each retrieval metric's mean over the draws, scored from one embedding of
    the set, and its sample standard deviation over two or more draws as `<split>_draw_std/<metric>`.
    Clustering metrics (`nmi`, `ami`, `f1` of seeded k-means with as many clusters as classes) cost a k-means,
    so by default they are computed on test splits only (`test`, `test_small`, ...), never at validation.
    They cluster `split.query`: under a query/gallery protocol the query set (the gallery is only searched),
    with draws the whole set, once. A split with `coarse` labels also reports `coarse_recall_at_1` and
    `coarse_map_at_r`.
    """
    ks = tuple(config.ks) if config.ks else split.ks
    embed_set = partial(
        embed_tensor,
        model,
        device=device,
        batch_size=config.batch_size,
        num_workers=num_workers,
        channels_last=channels_last,
        amp=amp,
    )
    query, labels = embed_set(split.query), split.query.labels
    spread = {}
    if split.draws is not None:
        metrics, spread = drawn_metrics(query, labels, split.draws, ks, config.backend)
    else:
        gallery = None if split.gallery is None else embed_set(split.gallery)
        gallery_labels = None if split.gallery is None else split.gallery.labels
        metrics = retrieval_metrics(query, labels, gallery, gallery_labels, ks=ks, backend=config.backend)
    if split.coarse is not None:
        metrics.update(coarse_metrics(query, split.coarse, config.backend))
    if clustering is None:
        clustering = split.name.startswith("test")
    if clustering:
        metrics.update(clustering_metrics(query, labels))
    result = {f"{split.name}/{key}": float(value) for key, value in metrics.items()}
    result.update({f"{split.name}{DRAW_STD}/{key}": float(value) for key, value in spread.items()})
    return result


def coarse_metrics(embeddings: torch.Tensor, coarse: np.ndarray, backend: Backend) -> dict[str, float]:
    """Leave-one-out Recall@1 and MAP@R with the coarse classes as the relevant items."""
    scores = retrieval_metrics(embeddings, coarse, ks=(1,), backend=backend)
    return {"coarse_recall_at_1": scores["recall_at_1"], "coarse_map_at_r": scores["map_at_r"]}


def drawn_metrics(
    embeddings: torch.Tensor, labels: np.ndarray, draws: list[Draw], ks: tuple[int, ...], backend: Backend
) -> tuple[dict[str, float], dict[str, float]]:
    """(mean, sample standard deviation) over the draws of each retrieval metric; no deviation for one draw.

    Each draw is scored query -> gallery from the stored embeddings: embedding is the expensive part.
    """
    per_draw = [score_draw(embeddings, labels, draw, ks, backend) for draw in draws]
    values = {key: np.array([m[key] for m in per_draw]) for key in per_draw[0]}
    mean = {key: float(v.mean()) for key, v in values.items()}
    std = {key: float(v.std(ddof=1)) for key, v in values.items()} if len(draws) > 1 else {}
    return mean, std


def score_draw(
    embeddings: torch.Tensor, labels: np.ndarray, draw: Draw, ks: tuple[int, ...], backend: Backend
) -> dict[str, float]:
    """Retrieval metrics of one draw: its query rows searched against its gallery rows."""
    query_ids, gallery_ids = draw
    query = embeddings[torch.as_tensor(query_ids, device=embeddings.device)]
    gallery = embeddings[torch.as_tensor(gallery_ids, device=embeddings.device)]
    return retrieval_metrics(query, labels[query_ids], gallery, labels[gallery_ids], ks=ks, backend=backend)
