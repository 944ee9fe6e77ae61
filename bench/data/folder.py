"""A user's own images, as dataset `folder`.

Either an image folder `root/<split>/<class>/*.{jpg,jpeg,png}` with splits `train` and `test` and optionally
`val` (used instead of the class-disjoint carve-out when present), or, with `data.options.csv: FILE`, a CSV
whose header names the columns `path,label,split` (paths relative to `data.root`, split one of
train/val/test). Classes are the folder names or CSV labels (strings); each split's labels are 0..C-1 in
sorted name order. Evaluation: leave-one-out retrieval within each of val and test, Recall@K for
`data.options.ks` (default 1, 2, 4, 8) and MAP@R.
"""

from __future__ import annotations

import csv
from pathlib import Path

from bench.config import DataConfig
from bench.data import DatasetBundle, DatasetError, EvalSplit, register_dataset
from bench.data.images import IMAGE_EXTENSIONS
from bench.data.readers import ReaderContext, parse_ks, readme

NAME = "folder"
SPLITS = ("train", "val", "test")
CSV_COLUMNS = ("path", "label", "split")
KS = (1, 2, 4, 8)

Listing = dict[str, tuple[list[str], list[str]]]  # split -> (paths, class names)


def scan_split(split_dir: Path, problems: list[str]) -> tuple[list[str], list[str]]:
    """Images of `split_dir/<class>/`; anything else there is reported, not read."""
    paths, names = [], []
    for entry in sorted(split_dir.iterdir()):
        if not entry.is_dir():
            problems.append(f"{entry}: not inside a class folder, ignored")
            continue
        files = sorted(f for f in entry.iterdir() if f.is_file())
        images = [f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS]
        if len(images) < len(files):
            problems.append(
                f"{entry}: {len(files) - len(images)} files without a {'/'.join(IMAGE_EXTENSIONS)} "
                "suffix ignored"
            )
        if not images:
            problems.append(f"{entry}: class folder without images, ignored")
        paths += [str(f) for f in images]
        names += [entry.name] * len(images)
    return paths, names


def scan_folders(root: Path, problems: list[str]) -> Listing:
    listing = {}
    for split in SPLITS:
        split_dir = root / split
        if split_dir.is_dir():
            listing[split] = scan_split(split_dir, problems)
        elif split != "val":
            raise DatasetError(
                f"folder: {split_dir} not found; expected {root}/train/<class>/*.jpg and "
                f"{root}/test/<class>/*.jpg (or data.options.csv). See {readme(NAME)}."
            )
    return listing


def read_csv_listing(path: Path, root: Path) -> Listing:
    """Rows of `path,label,split`, each error naming the file and line."""
    if not path.is_file():
        raise DatasetError(f"folder: CSV {path} (data.options.csv) not found. See {readme(NAME)}.")
    listing: Listing = {}
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = [column.strip() for column in next(reader, [])]
        if sorted(header) != sorted(CSV_COLUMNS):
            raise DatasetError(
                f"{path}, line 1: expected the header {','.join(CSV_COLUMNS)}, got {','.join(header)!r}"
            )
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            where = f"{path}, line {reader.line_num}"
            if len(row) != len(header):
                raise DatasetError(
                    f"{where}: expected {len(header)} fields ({','.join(header)}), got {len(row)}: {row!r}"
                )
            record = dict(zip(header, (cell.strip() for cell in row), strict=True))
            if not record["path"] or not record["label"]:
                raise DatasetError(f"{where}: empty path or label")
            if record["split"] not in SPLITS:
                raise DatasetError(
                    f"{where}: split must be one of {', '.join(SPLITS)}, got {record['split']!r}"
                )
            paths, names = listing.setdefault(record["split"], ([], []))
            paths.append(str(root / record["path"]))
            names.append(record["label"])
    for split in ("train", "test"):
        if split not in listing:
            raise DatasetError(f"{path}: no rows with split {split!r}")
    return listing


@register_dataset(NAME)
def load_folder(config: DataConfig, root: Path) -> DatasetBundle:
    ctx = ReaderContext(NAME, config, root)
    csv_option = config.options.get("csv")
    if csv_option:
        source = Path(csv_option) if Path(csv_option).is_absolute() else root / csv_option
        listing = read_csv_listing(source, root)
        ctx.sources.append(source)
        where = dict.fromkeys(listing, source)
    else:
        if not root.is_dir():
            raise DatasetError(f"folder: data.root {root} is not a directory. See {readme(NAME)}.")
        listing = scan_folders(root, ctx.problems)
        where = {split: root / split for split in listing}
    images = {split: ctx.images(split, *listing[split], where[split], None) for split in listing}
    ks = parse_ks(config.options, KS)
    return ctx.bundle(
        images["train"], [EvalSplit("test", images["test"], None, ks)], ks, val=images.get("val")
    )
