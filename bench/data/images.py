"""A dataset of image files: paths, class ids and a transform, decoded with PIL to RGB on access.

Labels are the class ids mapped to 0..C-1 in sorted id order; `classes[label]` gives the original id back, for
reports. A file that cannot be decoded raises a :class:`DatasetError` naming it, unless `skip_bad_images` is
set: then another image of the same class stands in (so labels and the P x K sampler stay valid), the file is
logged once, and `skipped` counts it across DataLoader worker processes.

`decode` says where the loaders decode: "cpu" (item access, in the workers) or "gpu" (the loaders take the
file bytes from `encoded` and decode on the device, `bench.data.device_decode`). Item access always decodes
with PIL, so code that looks at a single image works either way.
"""

from __future__ import annotations

import logging
import multiprocessing
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.io import read_file

from bench.data import DatasetError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# what PIL raises for missing, truncated or garbage files (UnidentifiedImageError is an OSError)
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
_TORCHVISION_SOURCE = re.compile(
    r"^\w+, \S+:\d+, "
)  # "decode_jpeg, .../decode_jpeg.cpp:171, " before the reason


def io_error_text(error: RuntimeError) -> str:
    """The reason in a torchvision.io error, without the C++ source location it starts with."""
    return _TORCHVISION_SOURCE.sub("", str(error))


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image fully (so a truncated file fails here, not later) and convert it to RGB."""
    with Image.open(path) as image:
        return image.convert("RGB")


class ImageList(Dataset):
    """Image files with labels known up front; the `LabeledDataset` every file-based reader returns."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        class_ids: Sequence | np.ndarray,
        transform: Callable | None = None,
        skip_bad_images: bool = False,
    ) -> None:
        if len(paths) != len(class_ids):
            raise ValueError(f"{len(paths)} paths but {len(class_ids)} class ids")
        classes, labels = np.unique(np.asarray(class_ids), return_inverse=True)
        self.paths = [str(p) for p in paths]
        self.labels = labels.astype(np.int64).reshape(-1)
        self.classes = classes
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        self.decode: Literal["cpu", "gpu"] = "cpu"  # set for a run by device_decode.set_decode
        self._skipped = multiprocessing.Value("q", 0)
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def class_ids(self) -> np.ndarray:
        """The original class id of every item (for reports)."""
        return self.classes[self.labels]

    @property
    def skipped(self) -> int:
        """How many distinct bad files were replaced, summed over all worker processes."""
        return int(self._skipped.value)

    def __getitem__(self, index: int) -> tuple:
        image = self._decode(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])

    def encoded(self, index: int) -> tuple[torch.Tensor, int]:
        """The file's bytes (uint8, 1-D) and the label, for decoding on the device."""
        try:
            return read_file(self.paths[index]), int(self.labels[index])
        except RuntimeError as error:
            raise DatasetError(f"cannot read image {self.paths[index]}: {io_error_text(error)}") from error

    def _decode(self, index: int) -> Image.Image:
        try:
            return load_rgb(self.paths[index])
        except DECODE_ERRORS as error:
            if not self.skip_bad_images:
                raise DatasetError(
                    f"cannot read image {self.paths[index]}: {error} "
                    "(pass --skip-bad-images to skip such files)"
                ) from error
            self._mark_bad(index, error)
        for other in self._same_class(index):
            try:
                return load_rgb(self.paths[other])
            except DECODE_ERRORS as error:
                self._mark_bad(other, error)
        raise DatasetError(
            f"every image of class {self.classes[self.labels[index]]!r} is unreadable, "
            f"e.g. {self.paths[index]}"
        )

    def _mark_bad(self, index: int, error: Exception) -> None:
        if index in self._bad:
            return
        self._bad.add(index)
        with self._skipped.get_lock():
            self._skipped.value += 1
        log.warning("skipping unreadable image %s: %s", self.paths[index], error)

    def _same_class(self, index: int) -> list[int]:
        """Other items of the same class, starting after `index`, known-bad ones left out."""
        members = np.flatnonzero(self.labels == self.labels[index])
        start = int(np.searchsorted(members, index, side="right"))
        ordered = np.concatenate([members[start:], members[:start]])
        return [int(i) for i in ordered if i != index and int(i) not in self._bad]

    def subset(
        self, indices: np.ndarray, transform: Callable | None = None, relabel: bool = True
    ) -> ImageList:
        """Items at `indices`; `relabel` maps their classes to 0..C'-1 again (False keeps this list's labels,
        so that a query and a gallery cut from one list share labels)."""
        indices = np.asarray(indices, dtype=np.int64)
        child = ImageList(
            [self.paths[i] for i in indices],
            self.class_ids[indices],
            self.transform if transform is None else transform,
            self.skip_bad_images,
        )
        child.decode = self.decode
        if not relabel:
            child.classes = self.classes
            child.labels = self.labels[indices].copy()
        return child
