"""Regenerate the bundled Grocery Store images from the authors' 348 px originals.

    python datasets/grocery/reencode.py SOURCE [DEST]

SOURCE is a GroceryStoreDataset checkout (or its `dataset/` folder); DEST defaults to this script's folder.
Every image named in train.txt, val.txt and test.txt is resized to SHORT_SIDE px on its short side (Lanczos,
aspect kept) and saved as JPEG at QUALITY without metadata, under the same relative path in DEST/dataset/.
The list files and classes.csv are copied unchanged, so both label levels survive. The output is
byte-identical for the same Pillow version (see README.md); compare the digest printed at the end.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

from PIL import Image

SHORT_SIDE = 96
QUALITY = 85
LISTS = ("train.txt", "val.txt", "test.txt")
COPIED = ("classes.csv", *LISTS)


def dataset_folder(source: Path) -> Path:
    """`source` itself or its `dataset/` subfolder, whichever holds classes.csv."""
    for candidate in (source, source / "dataset"):
        if (candidate / "classes.csv").is_file():
            return candidate
    raise SystemExit(f"classes.csv not found in {source} or {source / 'dataset'}")


def listed_images(folder: Path) -> list[str]:
    """Relative image paths of every list file, in list order (first field of `path, fine, coarse`)."""
    paths = []
    for name in LISTS:
        for line in (folder / name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                paths.append(line.split(",")[0].strip())
    return paths


def reencode(source: Path, target: Path) -> None:
    """Resize `source` so its short side is SHORT_SIDE and write it to `target` as JPEG."""
    with Image.open(source) as image:
        rgb = image.convert("RGB")
    scale = SHORT_SIDE / min(rgb.size)
    size = (round(rgb.width * scale), round(rgb.height * scale))
    target.parent.mkdir(parents=True, exist_ok=True)
    rgb.resize(size, Image.Resampling.LANCZOS).save(target, "JPEG", quality=QUALITY, optimize=True)


def digest(folder: Path, relative: list[str]) -> str:
    """SHA-256 over each copied file's and image's relative path and bytes, in sorted path order."""
    sha = hashlib.sha256()
    for path in sorted([*COPIED, *relative]):
        sha.update(path.encode() + b"\0" + (folder / path).read_bytes())
    return sha.hexdigest()


def main(argv: list[str]) -> None:
    if not 1 <= len(argv) <= 2:
        raise SystemExit(__doc__)
    source = dataset_folder(Path(argv[0]))
    dest = (Path(argv[1]) if len(argv) == 2 else Path(__file__).resolve().parent) / "dataset"
    dest.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        shutil.copyfile(source / name, dest / name)
    relative = listed_images(source)
    for path in relative:
        reencode(source / path, dest / path)
    print(f"{len(relative)} images written under {dest}; digest {digest(dest, relative)}")


if __name__ == "__main__":
    main(sys.argv[1:])
