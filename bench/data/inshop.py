"""In-Shop Clothes Retrieval (DeepFashion, Liu et al., CVPR 2016), read from `Eval/list_eval_partition.txt`.

The list's first line is the number of entries (52712), the second the header `image_name item_id
evaluation_status`, then one `img/WOMEN/Dresses/id_00000002/02_1_front.jpg id_00000002 train` per line
(whitespace-padded columns); image paths are relative to `Img/`. Train: 3,997 items, 25,882 images. Test:
3,985 items, 14,218 query images searched against 12,612 gallery images, Recall@1/10/20/30/40/50.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.config import DataConfig
from bench.data import DatasetBundle, DatasetError, EvalSplit, register_dataset
from bench.data.readers import Published, ReaderContext, locate, parse_ks

NAME = "inshop"
LIST = "list_eval_partition.txt"
COLUMNS = "image_name item_id evaluation_status"
PUBLISHED = {"train": Published(25_882, 3_997), "test": Published(14_218 + 12_612, 3_985)}
PUBLISHED_QUERY, PUBLISHED_GALLERY = 14_218, 12_612
KS = (1, 10, 20, 30, 40, 50)
STATUSES = ("train", "query", "gallery")


def unzip(pairs: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    return [path for path, _ in pairs], [item for _, item in pairs]


@register_dataset(NAME)
def load_inshop(config: DataConfig, root: Path) -> DatasetBundle:
    base = locate(root, LIST, NAME, subdirs=["Eval"])
    images = root / "Img" if (root / "Img").is_dir() else root
    ctx = ReaderContext(NAME, config, root)
    list_file = base / LIST
    entries: dict[str, list[tuple[str, str]]] = {status: [] for status in STATUSES}
    for row in ctx.read(list_file, COLUMNS, header=True, count_line=True):
        image, item, status = row.fields
        if status not in entries:
            raise DatasetError(
                f"{row.where()}: evaluation_status must be one of {', '.join(STATUSES)}, got {status!r}"
            )
        entries[status].append((str(images / image), item))
    train = ctx.images("train", *unzip(entries["train"]), list_file, PUBLISHED["train"])
    if not entries["query"] or not entries["gallery"]:
        raise DatasetError(
            f"{list_file}: needs both query and gallery entries. See datasets/{NAME}/README.md."
        )
    test = ctx.images("test", *unzip(entries["query"] + entries["gallery"]), list_file, PUBLISHED["test"])
    n_query = len(entries["query"])
    query = test.subset(np.arange(n_query), relabel=False)
    gallery = test.subset(np.arange(n_query, len(test)), relabel=False)
    ctx.check_published("test query", len(query), len(np.unique(query.labels)), Published(PUBLISHED_QUERY))
    ctx.check_published(
        "test gallery", len(gallery), len(np.unique(gallery.labels)), Published(PUBLISHED_GALLERY)
    )
    ks = parse_ks(config.options, KS)
    return ctx.bundle(train, [EvalSplit("test", query, gallery, ks)], ks)
