"""VGGFace2 (Cao et al., FG 2018), read from `train_list.txt` / `test_list.txt`.

Each list line is `<identity>/<file>` (`n000002/0001_01.jpg`), the image being `train/n000002/0001_01.jpg` or
`test/...`. Train: 8,631 identities / 3,141,890 images; test: 500 identities / 169,396 images. Test: retrieval
over the test identities, leave-one-out, MAP@R and Recall@1/10/100 (the Smooth-AP paper reports mAP).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from bench.config import DataConfig
from bench.data import DatasetBundle, DatasetError, EvalSplit, register_dataset
from bench.data.readers import Published, ReaderContext, Row, locate, parse_ks

NAME = "vggface2"
PUBLISHED = {"train": Published(3_141_890, 8_631), "test": Published(169_396, 500)}
KS = (1, 10, 100)


def identity(row: Row) -> str:
    parts = PurePosixPath(row.fields[0]).parts
    if len(parts) != 2 or not parts[1].lower().endswith(".jpg"):
        raise DatasetError(
            f"{row.where()}: expected <identity>/<file>.jpg, got {row.fields[0]!r} (truncated line?)"
        )
    return parts[0]


@register_dataset(NAME)
def load_vggface2(config: DataConfig, root: Path) -> DatasetBundle:
    base = locate(root, "train_list.txt", NAME)
    ctx = ReaderContext(NAME, config, root)
    splits = {}
    for split in ("train", "test"):
        list_file = base / f"{split}_list.txt"
        rows = ctx.read(list_file, "image_path")
        ids = [identity(row) for row in rows]
        splits[split] = ctx.images(
            split, [str(base / split / row.fields[0]) for row in rows], ids, list_file, PUBLISHED[split]
        )
    ks = parse_ks(config.options, KS)
    return ctx.bundle(splits["train"], [EvalSplit("test", splits["test"], None, ks)], ks)
