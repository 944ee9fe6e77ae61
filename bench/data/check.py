"""`smoothap-bench data check NAME --root PATH`: read a dataset as training would, decode every image, and
print classes and images per split and every problem found (missing files, damaged lists, counts that differ
from the published ones, unreadable images)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.config import DataConfig
from bench.data import DatasetError, load_dataset
from bench.data.images import DECODE_ERRORS, load_rgb
from bench.data.readers import named_datasets


@dataclass
class CheckReport:
    name: str
    root: str
    splits: dict[str, tuple[int, int]] = field(default_factory=dict)  # split -> (classes, images)
    problems: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.unreadable

    def lines(self) -> list[str]:
        out = [f"dataset {self.name} at {self.root}", f"  {'split':<16}{'classes':>10}{'images':>12}"]
        out += [f"  {split:<16}{classes:>10}{images:>12}" for split, (classes, images) in self.splits.items()]
        out.append(f"unreadable images: {len(self.unreadable)}")
        out += [f"  {path}" for path in self.unreadable]
        out.append("problems: " + ("none" if not self.problems else str(len(self.problems))))
        out += [f"  {problem}" for problem in self.problems]
        return out


def check_dataset(
    name: str,
    root: str | Path,
    *,
    options: dict | None = None,
    decode: bool = True,
    out: Callable[[str], None] | None = print,
) -> CheckReport:
    """Load dataset `name` from `root` without a validation carve-out (so `train` is the whole training
    split), decode every image unless `decode` is False, print the report through `out`, and return it."""
    report = CheckReport(name, str(root))
    try:
        bundle = load_dataset(
            DataConfig(name=name, root=str(root), val_fraction=0.0, options=dict(options or {}))
        )
    except (DatasetError, ValueError) as error:
        report.problems.append(str(error))
    else:
        report.problems += bundle.info.get("problems", [])
        for split, dataset in named_datasets(bundle):
            report.splits[split] = (len(np.unique(dataset.labels)), len(dataset))
            if decode and hasattr(dataset, "paths"):
                report.unreadable += unreadable_images(dataset.paths)
    if out is not None:
        for line in report.lines():
            out(line)
    return report


def unreadable_images(paths: list[str]) -> list[str]:
    """Each path that PIL cannot fully decode, with the reason."""
    bad = []
    for path in paths:
        try:
            load_rgb(path)
        except DECODE_ERRORS as error:
            bad.append(f"{path}: {error}")
    return bad
