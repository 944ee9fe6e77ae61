"""Dataset readers behind one registry.

A reader turns a dataset's official files into a :class:`DatasetBundle`: a training set, a class-disjoint
validation split carved out of the training classes, and one or more test splits evaluated by the
dataset's own protocol (leave-one-out, or query against gallery).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from bench.config import DataConfig


class LabeledDataset(Protocol):
    """What every split is: a torch Dataset of (image tensor, int label) with all labels known up front."""

    labels: np.ndarray  # int64, one per item, in item order

    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> tuple: ...


Draw = tuple[np.ndarray, np.ndarray]  # (query indices, gallery indices) into one evaluation set


@dataclass
class EvalSplit:
    """One retrieval evaluation. `gallery is None` means leave-one-out within `query`, unless `draws` is set.

    `draws` holds several query/gallery partitions of `query` (then the whole evaluation set), as index pairs
    into it: the set is embedded once, each draw is scored query -> gallery, and the split reports the mean
    over the draws (VehicleID's gallery protocol), since embedding is the expensive part.
    """

    name: str  # metric prefix: "val", "test", "test_small", ...
    query: LabeledDataset
    gallery: LabeledDataset | None = None
    ks: tuple[int, ...] = (1, 2, 4, 8)
    draws: list[Draw] | None = None
    coarse: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.coarse is not None and (
            self.gallery is not None or self.draws is not None or len(self.coarse) != len(self.query)
        ):
            raise ValueError(
                f"EvalSplit {self.name!r}: coarse labels need leave-one-out (no gallery, no draws) and one "
                f"per query item, got {len(self.coarse)} for {len(self.query)} items"
            )
        if self.draws is not None and (self.gallery is not None or not self.draws):
            raise ValueError(
                f"EvalSplit {self.name!r}: draws needs gallery=None (the draws index into query) and at "
                f"least one draw, got gallery={type(self.gallery).__name__} and {len(self.draws)} draws"
            )


@dataclass
class DatasetBundle:
    """Everything a run needs from a dataset. Exactly one of `tests` is named "test" (the headline split)."""

    name: str
    train: LabeledDataset
    val: EvalSplit | None
    tests: list[EvalSplit]
    info: dict = field(default_factory=dict)  # counts, content hash, skipped files: logged with the run


class DatasetError(RuntimeError):
    """A dataset on disk is missing, incomplete or unreadable; the message says which files and where to
    look."""


Reader = Callable[["DataConfig", Path], DatasetBundle]
_READERS: dict[str, Reader] = {}
REPOSITORY_DATASETS = Path(__file__).resolve().parents[2] / "datasets"  # the bundled Omniglot lives here
_ANNOUNCED: set[Path] = set()  # roots found in the repository, each said once per process


def register_dataset(name: str) -> Callable[[Reader], Reader]:
    """Decorator: make `reader(config, root)` available as dataset `name`."""

    def wrap(reader: Reader) -> Reader:
        _READERS[name] = reader
        return reader

    return wrap


def available_datasets() -> list[str]:
    _import_readers()
    return sorted(_READERS)


def load_dataset(config: DataConfig) -> DatasetBundle:
    """Read the dataset named by `config.name` from `config.root` (see `resolve_root`)."""
    _import_readers()
    if config.name not in _READERS:
        raise ValueError(
            f"data.name: unknown dataset {config.name!r}; available: {', '.join(sorted(_READERS))}"
        )
    return _READERS[config.name](config, resolve_root(config.root, config.name))


def resolve_root(root: str | Path, name: str) -> Path:
    """Where dataset `name` lives: `root` itself when it is absolute or exists from the working directory;
    else the same relative path in the repository's datasets/ folder (`datasets/omniglot` and `omniglot`
    alike), so the bundled configs work from any folder. A missing relative root fails naming every place
    looked in; an absolute one is left to the reader, whose message says what it expected there."""
    path = Path(root)
    if path.is_absolute() or path.exists():
        return path
    inside = Path(*path.parts[1:]) if path.parts[0] == "datasets" and len(path.parts) > 1 else path
    found = REPOSITORY_DATASETS / inside
    if found.exists():
        if found not in _ANNOUNCED:
            _ANNOUNCED.add(found)
            print(f"data.root {root} is not in {Path.cwd()}: reading {found}", file=sys.stderr)
        return found
    readme = REPOSITORY_DATASETS / name / "README.md"
    hint = f" See {readme} for where to get it." if readme.is_file() else ""
    raise DatasetError(f"data.root {root} not found: looked in {Path.cwd() / path} and {found}.{hint}")


def _import_readers() -> None:
    """Import reader modules lazily so that `import bench.data` stays cheap."""
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")
