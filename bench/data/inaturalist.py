"""iNaturalist 2018 with the class-disjoint split of Smooth-AP (Brown et al., ECCV 2020).

The split is published with the Smooth-AP code as `Inat_dataset_splits/Inaturalist_train_set1.txt` and
`Inaturalist_test_set1.txt`: one image path per line, relative to the dataset root
(`train_val2018/Plantae/7477/3b60c9486db1d2ee875f11a669fbde4b.jpg`), the class being the numeric category
folder (iNaturalist category ids are unique across super-categories). Train: 5,690 classes / 325,846 images;
test: 2,452 classes / 136,093 images, leave-one-out retrieval, Recall@1/4/16/32.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from bench.config import DataConfig
from bench.data import DatasetBundle, DatasetError, EvalSplit, register_dataset
from bench.data.readers import Published, ReaderContext, Row, locate, parse_ks

NAME = "inaturalist"
SPLIT_DIR = "Inat_dataset_splits"
LISTS = {
    "train": ("Inaturalist_train_set1.txt", Published(325_846, 5_690)),
    "test": ("Inaturalist_test_set1.txt", Published(136_093, 2_452)),
}
KS = (1, 4, 16, 32)


def category(row: Row) -> int:
    """The numeric category folder of `<root dir>/<super-category>/<category>/<file>.jpg`."""
    parts = PurePosixPath(row.fields[0]).parts
    if len(parts) < 4 or not parts[-2].isdigit():
        raise DatasetError(
            f"{row.where()}: expected a path like train_val2018/<super-category>/<category id>/<file>.jpg, "
            f"got {row.fields[0]!r} (truncated or damaged list file?)"
        )
    return int(parts[-2])


@register_dataset(NAME)
def load_inaturalist(config: DataConfig, root: Path) -> DatasetBundle:
    base = locate(root, f"{SPLIT_DIR}/{LISTS['train'][0]}", NAME)
    ctx = ReaderContext(NAME, config, root)
    splits = {}
    for split, (filename, published) in LISTS.items():
        list_file = base / SPLIT_DIR / filename
        rows = ctx.read(list_file, "image_path")
        paths = [str(base / row.fields[0]) for row in rows]
        splits[split] = ctx.images(split, paths, [category(row) for row in rows], list_file, published)
    ks = parse_ks(config.options, KS)
    return ctx.bundle(splits["train"], [EvalSplit("test", splits["test"], None, ks)], ks)
