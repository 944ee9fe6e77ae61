from pathlib import Path

import numpy as np
import pytest

from bench.config import DataConfig
from bench.data import DatasetError, load_dataset
from bench.data.omniglot import read_npz

ROOT = Path(__file__).resolve().parents[2] / "datasets" / "omniglot"


@pytest.fixture(scope="module")
def bundle():
    return load_dataset(DataConfig(name="omniglot", root=str(ROOT), image_size=28, val_fraction=0.2))


def test_standard_split_counts_and_class_disjoint_validation(bundle):
    info = bundle.info
    assert (info["train_classes"], info["val_classes"], info["test_classes"]) == (771, 193, 659)
    assert (info["train_images"], info["val_images"], info["test_images"]) == (771 * 20, 193 * 20, 13180)
    assert set(bundle.train.labels).isdisjoint(bundle.val.query.labels)
    assert max(bundle.train.labels) < min(bundle.val.query.labels)  # the last 20% of background classes
    assert [s.name for s in bundle.tests] == ["test"] and bundle.tests[0].gallery is None


def test_ink_is_one_and_images_match_the_archive(bundle):
    with np.load(ROOT / "images_evaluation.npz") as archive:
        raw = archive["images"]
    full, labels = read_npz(ROOT / "images_evaluation.npz", "test", 105)
    assert np.array_equal(full[7, 0].numpy() == 1.0, ~raw[0, 7])  # True in the file = background
    assert labels[7] == 0 and labels[20] == 1
    image, label = bundle.tests[0].query[25]
    assert image.shape == (1, 28, 28) and label == 1
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0


def test_missing_and_malformed_files_name_the_file(tmp_path):
    with pytest.raises(DatasetError, match="images_background.npz"):
        load_dataset(DataConfig(root=str(tmp_path)))
    np.savez(
        tmp_path / "images_background.npz", images=np.ones((3, 20, 105, 105), bool), labels=np.zeros((3, 20))
    )
    with pytest.raises(DatasetError, match=r"images_background.npz: images \(3, 20, 105, 105\)"):
        read_npz(tmp_path / "images_background.npz", "train", 28)
    (tmp_path / "images_evaluation.npz").write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="images_evaluation.npz: not a readable"):
        read_npz(tmp_path / "images_evaluation.npz", "test", 28)
