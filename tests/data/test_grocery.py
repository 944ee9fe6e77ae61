"""The bundled Grocery Store: counts, both label levels, the class-disjoint protocol, missing files, and the
coarse-label metrics against a brute-force float64 computation."""

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from dataset_trees import write_image

from bench.cli import main
from bench.config import DataConfig, EvalConfig
from bench.data import EvalSplit, load_dataset
from bench.data.check import check_dataset
from bench.evaluate import evaluate_split
from bench.report.tables import to_markdown

ROOT = Path(__file__).resolve().parents[2] / "datasets" / "grocery"
BASE = ROOT / "dataset"
HEADER = (
    "Class Name (str),Class ID (int),Coarse Class Name (str),Coarse Class ID (int),"
    "Iconic Image Path (str),Product Description Path (str)"
)


def classes_by_name() -> dict[str, tuple[int, int]]:
    """Fine class name -> (fine id, coarse id), read with the csv module's own header handling."""
    with (BASE / "classes.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {r["Class Name (str)"]: (int(r["Class ID (int)"]), int(r["Coarse Class ID (int)"])) for r in rows}


@pytest.fixture(scope="module")
def bundle():
    return load_dataset(DataConfig(name="grocery", root=str(ROOT), image_size=32, val_fraction=0.0))


def test_every_listed_photo_is_bundled_and_the_split_counts_hold(bundle):
    jpegs = sorted(str(p) for p in BASE.rglob("*.jpg"))
    assert len(jpegs) == 5421  # the dataset's published size (PROVENANCE.txt)
    split_paths = bundle.train.paths + bundle.tests[0].query.paths
    assert sorted(split_paths) == jpegs  # every photo in exactly one split
    assert (len(bundle.train), len(np.unique(bundle.train.labels))) == (2781, 41)
    assert (len(bundle.tests[0].query), len(np.unique(bundle.tests[0].query.labels))) == (2640, 40)
    odd_coarse = {coarse for fine, coarse in classes_by_name().values() if fine % 2}
    assert bundle.info["problems"] == [] and bundle.info["test_coarse_classes"] == len(odd_coarse) == 27


def test_fine_and_coarse_labels_match_each_photos_folder(bundle):
    """The truth: each photo's folder is its fine class name, looked up in classes.csv."""
    by_name = classes_by_name()
    test = bundle.tests[0]
    for dataset, coarse in ((bundle.train, None), (test.query, test.coarse)):
        for index, path in enumerate(dataset.paths):
            fine_id, coarse_id = by_name[Path(path).parent.name]
            assert dataset.class_ids[index] == fine_id, path
            if coarse is not None:
                assert coarse[index] == coarse_id, path


def test_splits_are_class_disjoint_and_spread_each_coarse_class(bundle):
    train_fine = set(bundle.train.class_ids.tolist())
    test_fine = set(bundle.tests[0].query.class_ids.tolist())
    assert train_fine.isdisjoint(test_fine) and len(train_fine | test_fine) == 81
    fines_of = {}
    for fine, coarse in classes_by_name().values():
        fines_of.setdefault(coarse, set()).add(fine)
    assert len(fines_of) == 43
    for coarse, fines in fines_of.items():
        if len(fines) > 1:
            assert fines & train_fine and fines & test_fine, f"coarse class {coarse} on one side only"


def test_validation_classes_come_out_of_the_training_classes():
    bundle = load_dataset(DataConfig(name="grocery", root=str(ROOT), image_size=32, val_fraction=0.2))
    train, val = set(bundle.train.class_ids.tolist()), set(bundle.val.query.class_ids.tolist())
    assert len(val) == 8 and train.isdisjoint(val) and len(train) == 33
    assert all(fine % 2 == 0 for fine in train | val)


def write_tree(root: Path) -> list[Path]:
    """A miniature in the upstream layout: classes.csv (six columns), `path, fine, coarse` lists, JPEGs.
    Fine 0 and 1 share coarse class 0; fine 2 is coarse 1; fine 3 is coarse 2."""
    base = root / "dataset"
    classes = [("Golden-Delicious", 0, "Apple", 0), ("Granny-Smith", 1, "Apple", 0)]
    classes += [("Avocado", 2, "Avocado", 1), ("Banana", 3, "Banana", 2)]
    base.mkdir(parents=True)
    lines = [HEADER] + [f"{n},{f},{c},{cid},/iconic/{n}.jpg,/iconic/{n}.txt" for n, f, c, cid in classes]
    (base / "classes.csv").write_text("\n".join(lines))
    images = []
    for split, per_class in (("train", 3), ("val", 1), ("test", 2)):
        rows = []
        for name, fine, coarse_name, coarse in classes:
            for k in range(per_class):
                relative = f"{split}/Fruit/{coarse_name}/{name}/{name}_{k:03d}.jpg"
                images.append(write_image(base / relative))
                rows.append(f"{relative}, {fine}, {coarse}")
        (base / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return images


def test_data_check_prints_counts_and_names_a_missing_photo(tmp_path, capsys):
    images = write_tree(tmp_path)
    main(["data", "check", "grocery", "--root", str(tmp_path)])
    out = capsys.readouterr().out
    assert "train                    2          12" in out  # fine 0 and 2, six photos each
    assert "test                     2          12" in out
    assert out.count("(not the full official lists)") == 2 and "missing" not in out  # a miniature
    missing = images[5]
    missing.unlink()
    assert main(["data", "check", "grocery", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert str(missing) in out and "1 of 12 images" in out  # a test-class photo


def test_a_coarse_id_that_contradicts_classes_csv_names_the_line(tmp_path):
    write_tree(tmp_path)
    listed = tmp_path / "dataset" / "val.txt"
    lines = listed.read_text().splitlines()
    lines[1] = lines[1].rsplit(",", 1)[0] + ", 2"  # Granny-Smith (fine 1) moved to coarse class 2
    listed.write_text("\n".join(lines))
    report = check_dataset("grocery", tmp_path, out=None)
    assert f"{listed}, line 2: coarse id 2" in report.problems[0]


def brute_force(embeddings: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Leave-one-out R@1 and MAP@R in float64, one query at a time, ties by index."""
    sims = embeddings.astype(np.float64) @ embeddings.astype(np.float64).T
    hits, aps = [], []
    for q in range(len(labels)):
        others = [i for i in range(len(labels)) if i != q]
        ranked = sorted(others, key=lambda i: (-sims[q, i], i))
        relevant = [labels[i] == labels[q] for i in ranked]
        r = sum(relevant)
        if r == 0:
            continue
        hits.append(float(relevant[0]))
        aps.append(sum(sum(relevant[: i + 1]) / (i + 1) for i in range(r) if relevant[i]) / r)
    return float(np.mean(hits)), float(np.mean(aps))


class Items(torch.utils.data.Dataset):
    def __init__(self, vectors: torch.Tensor, labels: np.ndarray) -> None:
        self.vectors, self.labels = vectors, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.vectors[index], int(self.labels[index])


def test_coarse_metrics_match_a_brute_force_computation():
    generator = torch.Generator().manual_seed(3)
    fine = np.repeat(np.arange(12), 5)
    coarse = fine // 3  # four coarse classes of three fine classes each
    centres = torch.randn(4, 6, generator=generator)[coarse] + 0.7 * torch.randn(60, 6, generator=generator)
    vectors = torch.nn.functional.normalize(centres, dim=1)
    split = EvalSplit("test", Items(vectors, fine), coarse=coarse)
    metrics = evaluate_split(torch.nn.Identity(), split, EvalConfig(), torch.device("cpu"), clustering=False)
    coarse_r1, coarse_map = brute_force(vectors.numpy(), coarse)
    fine_r1, fine_map = brute_force(vectors.numpy(), fine)
    assert metrics["test/coarse_recall_at_1"] == pytest.approx(coarse_r1, abs=1e-6)
    assert metrics["test/coarse_map_at_r"] == pytest.approx(coarse_map, abs=1e-6)
    assert metrics["test/recall_at_1"] == pytest.approx(fine_r1, abs=1e-6)
    assert metrics["test/map_at_r"] == pytest.approx(fine_map, abs=1e-6)
    assert coarse_map != pytest.approx(fine_map, abs=1e-3)  # the two levels really differ here


def test_coarse_labels_need_one_per_item_and_leave_one_out():
    items = Items(torch.zeros(4, 2), np.arange(4))
    with pytest.raises(ValueError, match="3 for 4 items"):
        EvalSplit("test", items, coarse=np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="leave-one-out"):
        EvalSplit("test", items, items, coarse=np.zeros(4, dtype=np.int64))


def test_the_comparison_table_shows_coarse_columns_only_when_logged():
    row = {"loss": "smooth_ap", "n_seeds": 2, "recall_at_1_mean": 0.5, "recall_at_1_ci95": 0.01}
    row.update({"map_at_r_mean": 0.2, "map_at_r_ci95": 0.01})
    with_coarse = {**row, "coarse_recall_at_1_mean": 0.6, "coarse_recall_at_1_ci95": 0.02}
    with_coarse.update({"coarse_map_at_r_mean": 0.3, "coarse_map_at_r_ci95": 0.02})
    fine_only = ["recall_at_1", "map_at_r"]
    table = to_markdown(pd.DataFrame([with_coarse]), [*fine_only, "coarse_recall_at_1", "coarse_map_at_r"])
    assert table.splitlines()[0] == "| Loss | R@1 | MAP@R | Coarse R@1 | Coarse MAP@R | Seeds |"
    assert "Coarse" not in to_markdown(pd.DataFrame([row]), fine_only)
    cells = table.splitlines()[2].split("|")[4:6]  # a single loss is the best: bold
    assert cells == [" **60.0 ± 2.0** ", " **30.0 ± 2.0** "]
