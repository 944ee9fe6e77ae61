"""Cars196 (Krause et al., 3dRR 2013), read from `cars_annos.mat` with scipy.io.

`annotations` is a MATLAB struct array with fields relative_im_path (`car_ims/000001.jpg`), bbox_x1, bbox_y1,
bbox_x2, bbox_y2, class (1-196) and test (the classification split, unused here). The metric-learning split:
classes 1-98 train (8,054 images), 99-196 test (8,131 images). Test: leave-one-out retrieval, Recall@1/2/4/8.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from bench.config import DataConfig
from bench.data import DatasetBundle, DatasetError, EvalSplit, register_dataset
from bench.data.readers import Published, ReaderContext, locate, parse_ks

NAME = "cars196"
ANNOTATIONS = "cars_annos.mat"
FIELDS = ("relative_im_path", "class")
PUBLISHED = {"train": Published(8_054, 98), "test": Published(8_131, 98)}
FIRST_TEST_CLASS = 99
KS = (1, 2, 4, 8)


def read_annotations(path: Path) -> tuple[list[str], np.ndarray]:
    """(relative image paths, class ids) of every record in `annotations`, naming the record on bad values."""
    try:
        mat = scipy.io.loadmat(path, squeeze_me=True)
    except (OSError, ValueError, TypeError) as error:
        raise DatasetError(f"{path}: not a readable MATLAB file: {error}") from error
    if "annotations" not in mat:
        raise DatasetError(
            f"{path}: no 'annotations' variable (found: {sorted(k for k in mat if not k.startswith('__'))})"
        )
    records = np.atleast_1d(mat["annotations"])
    fields = records.dtype.names or ()
    for field in FIELDS:
        if field not in fields:
            raise DatasetError(f"{path}: annotations lack the field {field!r} (fields: {', '.join(fields)})")
    paths, classes = [], []
    for index, record in enumerate(records):
        image, class_id = record["relative_im_path"], record["class"]
        if not isinstance(image, str) or not image or np.ndim(class_id) != 0:
            raise DatasetError(
                f"{path}: annotations({index + 1}) has relative_im_path={image!r}, class={class_id!r}; "
                "expected a path and one class id"
            )
        paths.append(image)
        classes.append(int(class_id))
    return paths, np.asarray(classes, dtype=np.int64)


@register_dataset(NAME)
def load_cars196(config: DataConfig, root: Path) -> DatasetBundle:
    base = locate(root, ANNOTATIONS, NAME)
    ctx = ReaderContext(NAME, config, root)
    annotations = base / ANNOTATIONS
    relative, classes = read_annotations(annotations)
    ctx.sources.append(annotations)
    splits = {}
    for split, mask in (("train", classes < FIRST_TEST_CLASS), ("test", classes >= FIRST_TEST_CLASS)):
        index = np.flatnonzero(mask)
        splits[split] = ctx.images(
            split, [str(base / relative[i]) for i in index], classes[index], annotations, PUBLISHED[split]
        )
    ks = parse_ks(config.options, KS)
    return ctx.bundle(splits["train"], [EvalSplit("test", splits["test"], None, ks)], ks)
