"""PKU VehicleID (Liu et al., CVPR 2016), read from `train_test_split/train_list.txt` and
`test_list_{800,1600,2400}.txt`.

Each list line is `<image name> <vehicle id>` (`0000001 1`); the image is `image/<image name>.jpg`. Train:
13,134 vehicles, 110,178 images. Test sets: small 800 vehicles / 7,332 images, medium 1,600 / 12,995, large
2,400 / 20,038, published as splits `test_small`, `test_medium` and `test` (= large, the headline split),
Recall@1/5.

Protocol (`data.options.protocol`):
- `retrieval` (default), as the Smooth-AP and FastAP code evaluates: every image of a test set queries all the
  other images of that set (leave-one-out).
- `gallery`, the original re-identification protocol of Liu et al.: per vehicle one image, drawn uniformly at
  random, forms the gallery; all other images are queries. As the papers report it, each test set is scored
  over `data.options.gallery_draws` (default 10) such draws and each metric is the mean over them
  (`<split>/<metric>`; the sample standard deviation over the draws is logged as `<split>_draw_std/<metric>`
  when there are two or more). Draw d (0, 1, ...) uses `numpy.random.default_rng([seed, d])` with `seed` =
  `data.options.seed` (default 0), so draw d is the same whatever the number of draws. The test set is
  embedded once for all draws; the clustering metrics cluster the whole test set once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.config import DataConfig
from bench.data import DatasetBundle, DatasetError, Draw, EvalSplit, register_dataset
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
GALLERY_DRAWS = 10  # as Liu et al. and the papers after them average


def one_per_class_gallery(labels: np.ndarray, rng: np.random.Generator) -> Draw:
    """(query indices, gallery indices), both sorted: one image of every class, uniformly at random, in the
    gallery (the first of its class in a random permutation), the rest queries."""
    order = rng.permutation(len(labels))
    _, first = np.unique(labels[order], return_index=True)
    gallery = np.sort(order[first])
    return np.setdiff1d(np.arange(len(labels)), gallery), gallery


def gallery_draws(labels: np.ndarray, seed: int, draws: int) -> list[Draw]:
    """`draws` galleries; draw d is seeded by (seed, d) alone, so it does not depend on how many are drawn."""
    return [one_per_class_gallery(labels, np.random.default_rng([seed, d])) for d in range(draws)]


def draw_settings(options: dict) -> tuple[int, int]:
    """(seed, number of draws) of the gallery protocol, from `data.options`."""
    return int_option(options, "seed", 0, minimum=0), int_option(options, "gallery_draws", GALLERY_DRAWS, 1)


def int_option(options: dict, key: str, default: int, minimum: int) -> int:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DatasetError(f"data.options.{key} must be an integer >= {minimum}, got {value!r}")
    return value


@register_dataset(NAME)
def load_vehicleid(config: DataConfig, root: Path) -> DatasetBundle:
    protocol = config.options.get("protocol", "retrieval")
    if protocol not in PROTOCOLS:
        raise DatasetError(f"data.options.protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    drawing = draw_settings(config.options) if protocol == "gallery" else None  # checked before any reading
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
        draws = gallery_draws(dataset.labels, *drawing) if drawing else None
        tests.append(EvalSplit(split, dataset, None, ks, draws))
    return ctx.bundle(splits["train"], tests, ks)
