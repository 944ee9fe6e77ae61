"""Stanford Online Products (Song et al., CVPR 2016), read from `Ebay_train.txt` / `Ebay_test.txt`.

Each list starts with the header `image_id class_id super_class_id path`; paths are relative to the dataset
directory (`bicycle_final/111085122871_0.JPG`). The class split is the authors': 11,318 training classes
(59,551 images), 11,316 test classes (60,502 images). Test: leave-one-out retrieval, Recall@1/10/100/1000.
"""

from __future__ import annotations

from pathlib import Path

from bench.config import DataConfig
from bench.data import DatasetBundle, EvalSplit, register_dataset
from bench.data.readers import Published, ReaderContext, locate, parse_ks

NAME = "sop"
COLUMNS = "image_id class_id super_class_id path"
PUBLISHED = {"train": Published(59_551, 11_318), "test": Published(60_502, 11_316)}
KS = (1, 10, 100, 1000)


@register_dataset(NAME)
def load_sop(config: DataConfig, root: Path) -> DatasetBundle:
    base = locate(root, "Ebay_train.txt", NAME, subdirs=["Stanford_Online_Products"])
    ctx = ReaderContext(NAME, config, root)
    splits = {}
    for split in ("train", "test"):
        list_file = base / f"Ebay_{split}.txt"
        rows = ctx.read(list_file, COLUMNS, header=True)
        class_ids = [row.integer(1, "class_id") for row in rows]
        paths = [str(base / row.fields[3]) for row in rows]
        splits[split] = ctx.images(split, paths, class_ids, list_file, PUBLISHED[split])
    ks = parse_ks(config.options, KS)
    return ctx.bundle(splits["train"], [EvalSplit("test", splits["test"], None, ks)], ks)
