"""Grocery Store (Klasson et al., WACV 2019), bundled in datasets/grocery, read from `classes.csv` and the
authors' `train.txt`, `val.txt`, `test.txt` (rows `path, fine id, coarse id`).

The authors' split is within-class (for classification), so retrieval pools all three lists and splits by
class: fine classes with an even id train (41 classes, 2,781 images), odd ids test (40 classes, 2,640 images).
Fine ids are numbered coarse class by coarse class, so every coarse class with two or more fine classes has
some on each side, and the test split keeps coarse labels: besides the fine-level metrics it reports
`coarse_recall_at_1` and `coarse_map_at_r` with coarse classes as the relevant items. Test: leave-one-out.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from bench.config import DataConfig
from bench.data import DatasetBundle, DatasetError, EvalSplit, register_dataset
from bench.data.readers import Published, ReaderContext, Row, locate, parse_ks, readme

NAME = "grocery"
LISTS = ("train.txt", "val.txt", "test.txt")
CLASS_COLUMNS = ["Class Name (str)", "Class ID (int)", "Coarse Class Name (str)", "Coarse Class ID (int)"]
LIST_COLUMNS = "path, fine id, coarse id"
PUBLISHED = {"train": Published(2_781, 41), "test": Published(2_640, 40)}
KS = (1, 2, 4, 8)


def is_test_class(fine: int) -> bool:
    """The protocol's one rule: odd fine ids are test classes."""
    return fine % 2 == 1


def csv_rows(ctx: ReaderContext, path: Path, n_fields: int, header: list[str] | None = None) -> list[Row]:
    """Comma-separated rows of at least `n_fields` stripped fields; `header`: the first row must start so."""
    if not path.is_file():
        raise DatasetError(f"{NAME}: {path} not found. See {readme(NAME)} for the expected layout.")
    ctx.sources.append(path)
    with path.open(encoding="utf-8", newline="") as handle:
        lines = [[field.strip() for field in fields] for fields in csv.reader(handle)]
    if header is not None:
        got = lines[0][: len(header)] if lines else []
        if got != header:
            raise DatasetError(f"{path}, line 1: expected a header starting {header}, got {got}")
    rows = []
    for number, fields in enumerate(lines, start=1):
        if (header is not None and number == 1) or not any(fields):
            continue
        if len(fields) < n_fields:
            raise DatasetError(
                f"{path}, line {number}: expected {n_fields} comma-separated fields, got {len(fields)}: "
                f"{','.join(fields)!r} (truncated or damaged file? see {readme(NAME)})"
            )
        rows.append(Row(path, number, fields))
    return rows


def read_classes(ctx: ReaderContext, path: Path) -> dict[int, int]:
    """Fine class id -> coarse class id, from classes.csv."""
    coarse_of = {}
    for row in csv_rows(ctx, path, len(CLASS_COLUMNS), CLASS_COLUMNS):
        fine = row.integer(1, "Class ID")
        if fine in coarse_of:
            raise DatasetError(f"{row.where()}: Class ID {fine} appears twice")
        coarse_of[fine] = row.integer(3, "Coarse Class ID")
    return coarse_of


def read_images(ctx: ReaderContext, base: Path, coarse_of: dict[int, int]) -> list[tuple[str, int, int]]:
    """(path, fine id, coarse id) of every image in the three lists, checked against classes.csv."""
    images = []
    for name in LISTS:
        for row in csv_rows(ctx, base / name, 3):
            fine, coarse = row.integer(1, "fine id"), row.integer(2, "coarse id")
            if fine not in coarse_of:
                raise DatasetError(f"{row.where()}: fine id {fine} is not in {base / 'classes.csv'}")
            if coarse != coarse_of[fine]:
                raise DatasetError(
                    f"{row.where()}: coarse id {coarse}, but {base / 'classes.csv'} puts fine class {fine} "
                    f"in coarse class {coarse_of[fine]}"
                )
            images.append((str(base / row.fields[0]), fine, coarse))
    return images


@register_dataset(NAME)
def load_grocery(config: DataConfig, root: Path) -> DatasetBundle:
    base = locate(root, "classes.csv", NAME, subdirs=["dataset"])
    ctx = ReaderContext(NAME, config, root)
    images = read_images(ctx, base, read_classes(ctx, base / "classes.csv"))
    listed_in = ", ".join(str(base / name) for name in LISTS)
    splits, coarse = {}, {}
    for split, wanted in (("train", False), ("test", True)):
        chosen = [image for image in images if is_test_class(image[1]) == wanted]
        splits[split] = ctx.images(
            split, [p for p, _, _ in chosen], [f for _, f, _ in chosen], listed_in, PUBLISHED[split]
        )
        coarse[split] = np.array([c for _, _, c in chosen], dtype=np.int64)
    ks = parse_ks(config.options, KS)
    test = EvalSplit("test", splits["test"], None, ks, coarse=coarse["test"])
    bundle = ctx.bundle(splits["train"], [test], ks)
    bundle.info["test_coarse_classes"] = len(np.unique(coarse["test"]))
    return bundle
