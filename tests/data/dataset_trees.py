"""Miniature copies of each dataset, written in its official on-disk format (file names, columns, separators,
header and count lines, a real MATLAB .mat for Cars196), with real 8x8 JPEG/PNG files.

Each builder returns a `Tree` whose `expected` is the ground truth it wrote: for every split as
`bench.data.readers.named_datasets` names it, the mapping image path -> original class id.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image


@dataclass
class Tree:
    name: str
    root: Path
    expected: dict[str, dict[str, object]]
    truncate: Callable[[], tuple[Path, int]] | None = (
        None  # damages one list line; returns (file, line number)
    )
    options: dict = field(default_factory=dict)

    def image(self, split: str, position: int = 0) -> Path:
        return Path(list(self.expected[split])[position])


_colour = iter(range(10**6))


def write_image(path: Path) -> Path:
    """A real 8x8 image with a distinct colour, format from the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = next(_colour)
    pixels = np.full((8, 8, 3), ((n * 37) % 256, (n * 91) % 256, (n * 53) % 256), dtype=np.uint8)
    pixels[0, 0] = (255 - pixels[0, 0, 0], 0, 0)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def replace_line(path: Path, number: int, new: str) -> tuple[Path, int]:
    lines = path.read_text().split("\n")
    lines[number - 1] = new
    path.write_text("\n".join(lines))
    return path, number


def cut_last_field(path: Path, number: int) -> tuple[Path, int]:
    line = path.read_text().split("\n")[number - 1]
    return replace_line(path, number, " ".join(line.split()[:-1]))


def sop_tree(tmp: Path) -> Tree:
    base = tmp / "Stanford_Online_Products"
    plan = {
        "train": [(1, 1, "bicycle", 3), (2, 1, "bicycle", 2), (3, 2, "cabinet", 3)],
        "test": [(11319, 1, "bicycle", 2), (11320, 3, "chair", 3)],
    }
    expected, image_id = {}, 0
    for split, classes in plan.items():
        lines, expected[split] = ["image_id class_id super_class_id path"], {}
        for class_id, super_id, super_name, count in classes:
            for k in range(count):
                image_id += 1
                relative = f"{super_name}_final/{111085122000 + class_id}_{k}.JPG"
                write_image(base / relative)
                lines.append(f"{image_id} {class_id} {super_id} {relative}")
                expected[split][str(base / relative)] = class_id
        (base / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
    return Tree("sop", tmp, expected, lambda: cut_last_field(base / "Ebay_train.txt", 3))


def cub_tree(tmp: Path) -> Tree:
    base = tmp / "CUB_200_2011"
    names = {c: f"{c:03d}.Bird_{c}" for c in range(1, 201)}
    (base).mkdir(parents=True)
    (base / "classes.txt").write_text("".join(f"{c} {n}\n" for c, n in names.items()))
    counts = {1: 3, 2: 2, 101: 2, 150: 3}
    images, labels, expected = [], [], {"train": {}, "test": {}}
    for class_id, count in counts.items():
        for k in range(count):
            image_id = len(images) + 1
            relative = f"{names[class_id]}/Bird_{class_id}_{k:04d}_{790000 + image_id}.jpg"
            write_image(base / "images" / relative)
            images.append(f"{image_id} {relative}\n")
            labels.append(f"{image_id} {class_id}\n")
            expected["train" if class_id <= 100 else "test"][str(base / "images" / relative)] = class_id
    (base / "images.txt").write_text("".join(images))
    (base / "image_class_labels.txt").write_text("".join(labels))
    return Tree("cub200", tmp, expected, lambda: cut_last_field(base / "image_class_labels.txt", 4))


def write_cars_annos(
    path: Path, records: list[tuple[str, int, int]], fields: tuple[str, ...] | None = None
) -> None:
    """cars_annos.mat as distributed: a 1xN struct array `annotations` and a 1x196 cell array
    `class_names`."""
    fields = fields or ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")
    table = np.empty(len(records), dtype=[(name, object) for name in fields])
    for i, (relative, class_id, test) in enumerate(records):
        values = {
            "relative_im_path": relative,
            "bbox_x1": np.array([[1]], dtype=np.uint16),
            "bbox_y1": np.array([[2]], dtype=np.uint16),
            "bbox_x2": np.array([[7]], dtype=np.uint16),
            "bbox_y2": np.array([[6]], dtype=np.uint16),
            "class": np.array([[class_id]], dtype=np.uint8),
            "test": np.array([[test]], dtype=np.uint8),
        }
        table[i] = tuple(values[name] for name in fields)
    class_names = np.array([f"Make Model {c}" for c in range(1, 197)], dtype=object)
    scipy.io.savemat(path, {"annotations": table.reshape(1, -1), "class_names": class_names.reshape(1, -1)})


def cars_tree(tmp: Path) -> Tree:
    counts = {1: 3, 2: 2, 99: 2, 196: 3}
    records, expected = [], {"train": {}, "test": {}}
    for class_id, count in counts.items():
        for k in range(count):
            relative = f"car_ims/{len(records) + 1:06d}.jpg"
            write_image(tmp / relative)
            records.append((relative, class_id, k % 2))
            expected["train" if class_id <= 98 else "test"][str(tmp / relative)] = class_id
    write_cars_annos(tmp / "cars_annos.mat", records)
    return Tree("cars196", tmp, expected)


def inshop_tree(tmp: Path) -> Tree:
    entries = [  # (item, status, count)
        ("id_00000001", "train", 3),
        ("id_00000004", "train", 2),
        ("id_00000002", "query", 1),
        ("id_00000002", "gallery", 2),
        ("id_00000007", "query", 2),
        ("id_00000007", "gallery", 1),
        ("id_00000009", "gallery", 1),
    ]
    lines, expected = [], {"train": {}, "test_query": {}, "test_gallery": {}}
    views = iter(f"{n:02d}_{v}" for n in range(1, 100) for v in ("1_front", "2_side", "3_back", "4_full"))
    for item, status, count in entries:
        for _ in range(count):
            relative = f"img/WOMEN/Dresses/{item}/{next(views)}.jpg"
            write_image(tmp / "Img" / relative)
            lines.append(f"{relative:<64}{item:<14}{status}")
            key = "train" if status == "train" else f"test_{status}"
            expected[key][str(tmp / "Img" / relative)] = item
    text = f"{len(lines)}\nimage_name item_id evaluation_status\n" + "\n".join(lines) + "\n"
    (tmp / "Eval").mkdir()
    (tmp / "Eval" / "list_eval_partition.txt").write_text(text)
    return Tree("inshop", tmp, expected, lambda: cut_last_field(tmp / "Eval" / "list_eval_partition.txt", 5))


def vehicleid_tree(tmp: Path) -> Tree:
    plan = {
        "train_list.txt": ("train", {1: 3, 3: 2}),
        "test_list_800.txt": ("test_small", {10: 2, 11: 3}),
        "test_list_1600.txt": ("test_medium", {10: 2, 11: 3, 12: 2}),
        "test_list_2400.txt": ("test", {10: 2, 11: 3, 12: 2, 13: 2}),
    }
    (tmp / "train_test_split").mkdir()
    expected, written = {}, {}
    for filename, (split, counts) in plan.items():
        lines, expected[split] = [], {}
        for vehicle, count in counts.items():
            for k in range(count):
                key = (vehicle, k)
                if key not in written:
                    written[key] = f"{len(written) + 1:07d}"
                    write_image(tmp / "image" / f"{written[key]}.jpg")
                lines.append(f"{written[key]} {vehicle}")
                expected[split][str(tmp / "image" / f"{written[key]}.jpg")] = vehicle
        (tmp / "train_test_split" / filename).write_text("\n".join(lines) + "\n")
    return Tree(
        "vehicleid", tmp, expected, lambda: cut_last_field(tmp / "train_test_split" / "train_list.txt", 2)
    )


def inaturalist_tree(tmp: Path) -> Tree:
    plan = {
        "train": [("Plantae", 7477, 3), ("Aves", 2042, 2)],
        "test": [("Insecta", 5010, 2), ("Plantae", 6001, 3)],
    }
    (tmp / "Inat_dataset_splits").mkdir()
    expected = {}
    for split, classes in plan.items():
        lines, expected[split] = [], {}
        for supercategory, category, count in classes:
            for k in range(count):
                relative = (
                    f"train_val2018/{supercategory}/{category}/{k:04d}b60c9486db1d2ee875f11a669fbde4b.jpg"
                )
                write_image(tmp / relative)
                lines.append(relative)
                expected[split][str(tmp / relative)] = category
        (tmp / "Inat_dataset_splits" / f"Inaturalist_{split}_set1.txt").write_text("\n".join(lines) + "\n")
    train_list = tmp / "Inat_dataset_splits" / "Inaturalist_train_set1.txt"
    return Tree("inaturalist", tmp, expected, lambda: replace_line(train_list, 4, "train_val2018/Aves/20"))


def vggface2_tree(tmp: Path) -> Tree:
    plan = {"train": {"n000002": 3, "n000003": 2}, "test": {"n000001": 2, "n000009": 3}}
    expected = {}
    for split, identities in plan.items():
        lines, expected[split] = [], {}
        for identity, count in identities.items():
            for k in range(count):
                relative = f"{identity}/{k + 1:04d}_01.jpg"
                write_image(tmp / split / relative)
                lines.append(relative)
                expected[split][str(tmp / split / relative)] = identity
        (tmp / f"{split}_list.txt").write_text("\n".join(lines) + "\n")
    return Tree("vggface2", tmp, expected, lambda: replace_line(tmp / "train_list.txt", 2, "n000002/00"))


def folder_tree(tmp: Path, with_val: bool = False) -> Tree:
    plan = {"train": {"cat": 3, "dog": 2, "emu": 2}, "test": {"fox": 2, "gnu": 3}}
    if with_val:
        plan["val"] = {"hen": 2, "ibis": 2}
    expected = {}
    for split, classes in plan.items():
        expected[split] = {}
        for name, count in classes.items():
            for k in range(count):
                path = write_image(tmp / split / name / f"img{k}.{'png' if k % 2 else 'jpg'}")
                expected[split][str(path)] = name
    (tmp / "train" / "cat" / "notes.txt").write_text("not an image\n")
    return Tree("folder", tmp, expected)


def folder_csv_tree(tmp: Path) -> Tree:
    plan = {"train": {"cat": 3, "dog": 2}, "test": {"fox": 2, "gnu": 3}}
    lines, expected = ["path,label,split"], {}
    for split, classes in plan.items():
        expected[split] = {}
        for name, count in classes.items():
            for k in range(count):
                relative = f"pictures/{name}_{split}_{k}.jpg"
                write_image(tmp / relative)
                lines.append(f"{relative},{name},{split}")
                expected[split][str(tmp / relative)] = name
    (tmp / "listing.csv").write_text("\n".join(lines) + "\n")
    return Tree(
        "folder",
        tmp,
        expected,
        lambda: replace_line(tmp / "listing.csv", 3, "pictures/cat_train_1.jpg,cat"),
        {"csv": "listing.csv"},
    )


BUILDERS = {
    "sop": sop_tree,
    "cub200": cub_tree,
    "cars196": cars_tree,
    "inshop": inshop_tree,
    "vehicleid": vehicleid_tree,
    "inaturalist": inaturalist_tree,
    "vggface2": vggface2_tree,
    "folder": folder_tree,
    "folder_csv": folder_csv_tree,
}
