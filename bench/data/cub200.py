"""CUB-200-2011 (Wah et al., 2011), read from `images.txt`, `image_class_labels.txt` and `classes.txt`.

The metric-learning split (not the archive's own train_test_split.txt): classes 1-100 train (5,864 images),
101-200 test (5,924 images). Test: leave-one-out retrieval, Recall@1/2/4/8.
"""

from __future__ import annotations

from pathlib import Path

from bench.config import DataConfig
from bench.data import DatasetBundle, DatasetError, EvalSplit, register_dataset
from bench.data.readers import Published, ReaderContext, locate, parse_ks

NAME = "cub200"
PUBLISHED = {"train": Published(5_864, 100), "test": Published(5_924, 100)}
FIRST_TEST_CLASS = 101
KS = (1, 2, 4, 8)


@register_dataset(NAME)
def load_cub200(config: DataConfig, root: Path) -> DatasetBundle:
    base = locate(root, "images.txt", NAME, subdirs=["CUB_200_2011"])
    ctx = ReaderContext(NAME, config, root)
    known_classes = {
        row.integer(0, "class_id") for row in ctx.read(base / "classes.txt", "class_id class_name")
    }
    paths = {
        row.integer(0, "image_id"): row.fields[1]
        for row in ctx.read(base / "images.txt", "image_id image_name")
    }
    labels_file = base / "image_class_labels.txt"
    labels = {}
    for row in ctx.read(labels_file, "image_id class_id"):
        image_id, class_id = row.integer(0, "image_id"), row.integer(1, "class_id")
        if image_id not in paths:
            raise DatasetError(f"{row.where()}: image_id {image_id} is not in {base / 'images.txt'}")
        if class_id not in known_classes:
            raise DatasetError(f"{row.where()}: class_id {class_id} is not in {base / 'classes.txt'}")
        labels[image_id] = class_id
    unlabelled = sorted(set(paths) - set(labels))
    if unlabelled:
        raise DatasetError(
            f"{labels_file}: {len(unlabelled)} image ids have no class, first: {unlabelled[:5]}"
        )
    splits = {}
    for split, in_split in (
        ("train", lambda c: c < FIRST_TEST_CLASS),
        ("test", lambda c: c >= FIRST_TEST_CLASS),
    ):
        ids = [i for i in sorted(paths) if in_split(labels[i])]
        splits[split] = ctx.images(
            split,
            [str(base / "images" / paths[i]) for i in ids],
            [labels[i] for i in ids],
            base / "images.txt",
            PUBLISHED[split],
        )
    ks = parse_ks(config.options, KS)
    return ctx.bundle(splits["train"], [EvalSplit("test", splits["test"], None, ks)], ks)
