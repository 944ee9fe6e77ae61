"""What the file-based readers share: list-file parsing with line-numbered errors, the on-disk check, the
check against the published counts, and assembling a :class:`DatasetBundle` with the class-disjoint validation
carve-out.

Published counts. A reader declares each split's published (images, classes). `data.options.expect_counts`:
- `auto` (default): a split whose list has exactly the published number of images must also have the published
  number of classes, or loading fails (a damaged copy of the official list). A list of any other length is a
  subset or a modified copy: the mismatch is recorded as a problem (logged, in `bundle.info["problems"]`, and
  printed by `data check`) and loading goes on. That is how the miniature trees in the tests load.
- `true`: any mismatch with the published counts fails.
- `false`: no comparison.
Files named by a list but absent on disk always fail, naming how many and the first few.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.config import DataConfig
from bench.data import DatasetBundle, DatasetError, EvalSplit
from bench.data.images import ImageList
from bench.data.splits import carve_validation
from bench.data.transforms import make_transforms

log = logging.getLogger(__name__)

SHOW_FIRST = 5  # how many offending files an error message names


def readme(name: str) -> str:
    return f"datasets/{name}/README.md"


@dataclass(frozen=True)
class Published:
    """A split's size as its authors publish it."""

    images: int
    classes: int | None = None


@dataclass(frozen=True)
class Row:
    """One entry of a list file, with where it came from for error messages."""

    file: Path
    line: int
    fields: list[str]

    def where(self) -> str:
        return f"{self.file}, line {self.line}"

    def integer(self, index: int, column: str) -> int:
        try:
            return int(self.fields[index])
        except ValueError:
            raise DatasetError(
                f"{self.where()}: {column} must be an integer, got {self.fields[index]!r}"
            ) from None


def read_rows(
    path: Path, columns: str, dataset: str, *, header: bool = False, count_line: bool = False
) -> list[Row]:
    """Whitespace-separated rows of exactly `len(columns.split())` fields. `header`: the first line (after the
    count line, if any) must read `columns`. `count_line`: the first line is the number of entries,
    checked."""
    if not path.is_file():
        raise DatasetError(
            f"{dataset}: list file {path} not found. See {readme(dataset)} for the expected layout."
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: cannot read list file: {error}") from error
    start, declared = 0, None
    if count_line:
        first = lines[0].strip() if lines else ""
        if not first.isdigit():
            raise DatasetError(f"{path}, line 1: expected the number of entries, got {first!r}")
        start, declared = 1, int(first)
    if header:
        got = " ".join(lines[start].split()) if len(lines) > start else ""
        if got != columns:
            raise DatasetError(f"{path}, line {start + 1}: expected the header {columns!r}, got {got!r}")
        start += 1
    n_fields = len(columns.split())
    rows = []
    for number, line in enumerate(lines[start:], start=start + 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != n_fields:
            raise DatasetError(
                f"{path}, line {number}: expected {n_fields} fields ({columns}), got {len(fields)}: "
                f"{line.strip()!r} (truncated or damaged list file? see {readme(dataset)})"
            )
        rows.append(Row(path, number, fields))
    if declared is not None and declared != len(rows):
        raise DatasetError(
            f"{path}: line 1 declares {declared} entries but {len(rows)} follow (truncated file?)"
        )
    return rows


def missing_files(paths: Sequence[str]) -> list[str]:
    """Paths that do not exist, listing each directory once (far cheaper than a stat per file on big
    datasets)."""
    listings: dict[str, set[str]] = {}
    missing = []
    for path in paths:
        parent, name = os.path.split(path)
        if parent not in listings:
            try:
                listings[parent] = set(os.listdir(parent))
            except OSError:
                listings[parent] = set()
        if name not in listings[parent]:
            missing.append(path)
    return missing


def locate(root: Path, marker: str, dataset: str, subdirs: Sequence[str] = ()) -> Path:
    """The dataset directory: `root` itself or one of `subdirs` below it (as the archive unpacks), whichever
    holds `marker`."""
    for candidate in [root, *(root / sub for sub in subdirs)]:
        if (candidate / marker).exists():
            return candidate
    places = ", ".join(str(c) for c in [root, *(root / sub for sub in subdirs)])
    raise DatasetError(
        f"{dataset}: {marker} not found in {places}. See {readme(dataset)} for the expected layout."
    )


def parse_expect_counts(options: dict) -> bool | str:
    value = options.get("expect_counts", "auto")
    if value not in (True, False, "auto"):
        raise DatasetError(f"data.options.expect_counts must be true, false or auto, got {value!r}")
    return value


def parse_ks(options: dict, default: tuple[int, ...]) -> tuple[int, ...]:
    """The dataset's K list, or `data.options.ks` when given."""
    ks = options.get("ks", default)
    if not isinstance(ks, (list, tuple)) or not ks or not all(isinstance(k, int) and k > 0 for k in ks):
        raise DatasetError(f"data.options.ks must be a non-empty list of positive integers, got {ks!r}")
    return tuple(ks)


class ReaderContext:
    """Collects one reader's splits, problems and source files, and builds the bundle."""

    def __init__(self, name: str, config: DataConfig, root: Path) -> None:
        self.name = name
        self.config = config
        self.root = root
        self.train_transform, self.test_transform = make_transforms(config)
        self.expect_counts = parse_expect_counts(config.options)
        self.problems: list[str] = []
        self.sources: list[Path] = []

    def read(self, path: Path, columns: str, *, header: bool = False, count_line: bool = False) -> list[Row]:
        rows = read_rows(path, columns, self.name, header=header, count_line=count_line)
        self.sources.append(path)
        return rows

    def images(
        self,
        split: str,
        paths: Sequence[str],
        class_ids: Sequence,
        listed_in: Path | str,
        published: Published | None,
    ) -> ImageList:
        """An ImageList (test transform) after checking every file exists and the split's published size."""
        if not paths:
            raise DatasetError(
                f"{self.name}: split {split!r} from {listed_in} is empty. See {readme(self.name)}."
            )
        missing = missing_files(paths)
        if missing:
            first = ", ".join(missing[:SHOW_FIRST])
            raise DatasetError(
                f"{self.name}: {len(missing)} of {len(paths)} images listed in {listed_in} "
                f"are missing, first: {first}. "
                f"See {readme(self.name)} for where to download the dataset and how to lay it out."
            )
        if published is not None:
            self.check_published(split, len(paths), len(set(class_ids)), published)
        return ImageList(paths, class_ids, self.test_transform, self.config.skip_bad_images)

    def check_published(self, split: str, images: int, classes: int, published: Published) -> None:
        if images == published.images and published.classes in (None, classes):
            return
        if self.expect_counts is False:
            return
        message = (
            f"{self.name} {split}: found {images} images / {classes} classes; the published split has "
            f"{published.images} images" + (f" / {published.classes} classes" if published.classes else "")
        )
        if self.expect_counts is True or images == published.images:
            raise DatasetError(f"{message}. See {readme(self.name)}.")
        self.problems.append(f"{message} (not the full official lists)")
        log.warning("%s; set data.options.expect_counts: true to make this an error", self.problems[-1])

    def bundle(
        self, train: ImageList, tests: list[EvalSplit], ks: tuple[int, ...], val: ImageList | None = None
    ) -> DatasetBundle:
        """Carve the validation classes out of `train` (unless the dataset brings its own `val`), give
        training the train transform, and record counts, problems and a content hash in `info`."""
        if val is None:
            try:
                train_idx, val_idx = carve_validation(train.labels, self.config.val_fraction)
            except ValueError as error:
                raise DatasetError(f"{self.name}: {error}") from error
            val = train.subset(val_idx) if len(val_idx) else None
            train = train.subset(train_idx, transform=self.train_transform)
        else:
            train = train.subset(np.arange(len(train)), transform=self.train_transform)
        val_split = EvalSplit("val", val, None, ks) if val is not None else None
        bundle = DatasetBundle(self.name, train, val_split, tests, {})
        bundle.info = {"root": str(self.root), **split_counts(bundle), "problems": list(self.problems)}
        bundle.info["content_hash"] = self.content_hash(bundle)
        bundle.info["skip_bad_images"] = self.config.skip_bad_images
        return bundle

    def content_hash(self, bundle: DatasetBundle) -> str:
        """Hash of the list files, or of the file listing where the dataset has none (the folder reader)."""
        digest = hashlib.sha256()
        if self.sources:
            for path in self.sources:
                digest.update(path.read_bytes())
        else:
            for split, dataset in named_datasets(bundle):
                for path, class_id in zip(dataset.paths, dataset.class_ids, strict=True):
                    digest.update(f"{split}\t{os.path.relpath(path, self.root)}\t{class_id}\n".encode())
        return digest.hexdigest()[:16]


def named_datasets(bundle: DatasetBundle) -> list[tuple[str, ImageList]]:
    """Every dataset in a bundle with a name: train, val, `<test>` or `<test>_query` / `<test>_gallery`."""
    named = [("train", bundle.train)]
    for split in ([bundle.val] if bundle.val else []) + bundle.tests:
        if split.gallery is None:
            named.append((split.name, split.query))
        else:
            named += [(f"{split.name}_query", split.query), (f"{split.name}_gallery", split.gallery)]
    return named


def split_counts(bundle: DatasetBundle) -> dict[str, int]:
    """`<split>_images` and `<split>_classes` for every split; a query/gallery split's classes are their
    union."""
    counts = {"train_images": len(bundle.train), "train_classes": len(np.unique(bundle.train.labels))}
    for split in ([bundle.val] if bundle.val else []) + bundle.tests:
        labels = [split.query.labels]
        if split.gallery is None:
            counts[f"{split.name}_images"] = len(split.query)
        else:
            counts[f"{split.name}_query_images"] = len(split.query)
            counts[f"{split.name}_gallery_images"] = len(split.gallery)
            labels.append(split.gallery.labels)
        counts[f"{split.name}_classes"] = len(np.unique(np.concatenate(labels)))
    return counts
