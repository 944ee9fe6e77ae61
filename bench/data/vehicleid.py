"""PKU VehicleID (Liu et al., CVPR 2016), read from `train_test_split/train_list.txt` and
`test_list_{800,1600,2400}.txt`.

Each list line is `<image name> <vehicle id>` (`0000001 1`); the image is `image/<image name>.jpg`. Train:
13,134 vehicles, 110,178 images. Test sets: small 800 vehicles / 7,332 images, medium 1,600 / 12,995, large
2,400 / 20,038, published as splits `test_small`, `test_medium` and `test` (= large, the headline split),
Recall@1/5.

Protocol (`data.options.protocol`):
- `retrieval` (default), as the Smooth-AP and FastAP code evaluates: every image of a test set queries all the
  other images of that set (leave-one-out).
- `gallery`, the original re-identification protocol of Liu et al.: per vehicle one image, drawn with
  `numpy.random.default_rng(data.options.seed, default 0)`, forms the gallery; all other images are queries.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.config import DataConfig
from bench.data import DatasetBundle, DatasetError, EvalSplit, register_dataset
from bench.data.images import ImageList
from bench.data.readers import Published, ReaderContext, locate, parse_ks

NAME = "vehicleid"
COLUMNS = "image_name vehicle_id"
LISTS = {
    "train": ("train_list.txt", Published(110_178, 13_134)),
    "test_small": ("test_list_800.txt", Published(7_332, 800)),
    "test_medium": ("test_list_1600.txt", Published(12_995, 1_600)),
    "test": ("test_list_2400.txt", Published(20_038, 2_400)),
}
KS = (1, 5)
PROTOCOLS = ("retrieval", "gallery")


def one_per_class_gallery(dataset: ImageList, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(query indices, gallery indices): one random image of every class in the gallery, the rest queries."""
    rng = np.random.default_rng(seed)
    gallery = np.array([rng.choice(np.flatnonzero(dataset.labels == c)) for c in range(len(dataset.classes))])
    query = np.setdiff1d(np.arange(len(dataset)), gallery)
    return query, np.sort(gallery)


@register_dataset(NAME)
def load_vehicleid(config: DataConfig, root: Path) -> DatasetBundle:
    protocol = config.options.get("protocol", "retrieval")
    if protocol not in PROTOCOLS:
        raise DatasetError(f"data.options.protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    base = locate(root, "train_test_split/train_list.txt", NAME, subdirs=["VehicleID_V1.0"])
    ctx = ReaderContext(NAME, config, root)
    splits = {}
    for split, (filename, published) in LISTS.items():
        list_file = base / "train_test_split" / filename
        rows = ctx.read(list_file, COLUMNS)
        paths = [str(base / "image" / f"{row.fields[0]}.jpg") for row in rows]
        splits[split] = ctx.images(
            split, paths, [row.integer(1, "vehicle_id") for row in rows], list_file, published
        )
    ks = parse_ks(config.options, KS)
    tests = []
    for split in ("test_small", "test_medium", "test"):
        dataset = splits[split]
        if protocol == "retrieval":
            tests.append(EvalSplit(split, dataset, None, ks))
        else:
            query, gallery = one_per_class_gallery(dataset, int(config.options.get("seed", 0)))
            tests.append(
                EvalSplit(
                    split, dataset.subset(query, relabel=False), dataset.subset(gallery, relabel=False), ks
                )
            )
    return ctx.bundle(splits["train"], tests, ks)
