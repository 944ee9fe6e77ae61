"""Every reader against a miniature tree in its dataset's official format: splits, classes, labels and the
documented errors for a missing file, a damaged list line and a corrupt image."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from dataset_trees import BUILDERS, Tree, write_image

from bench.config import DataConfig
from bench.data import DatasetError, load_dataset
from bench.data.readers import named_datasets

KS = {
    "sop": (1, 10, 100, 1000),
    "cub200": (1, 2, 4, 8),
    "cars196": (1, 2, 4, 8),
    "inshop": (1, 10, 20, 30, 40, 50),
    "vehicleid": (1, 5),
    "inaturalist": (1, 4, 16, 32),
    "vggface2": (1, 10, 100),
    "folder": (1, 2, 4, 8),
}
WITH_PUBLISHED_COUNTS = [name for name in BUILDERS if not name.startswith("folder")]
FOLDER_README = "datasets/folder/README.md"


def config(tree: Tree, **changes) -> DataConfig:
    values = dict(
        name=tree.name, root=str(tree.root), image_size=8, val_fraction=0.0, options=dict(tree.options)
    )
    values.update(changes)
    return DataConfig(**values)


@pytest.fixture(params=list(BUILDERS))
def tree(request, tmp_path) -> Tree:
    return BUILDERS[request.param](tmp_path)


@pytest.fixture(params=WITH_PUBLISHED_COUNTS)
def published_tree(request, tmp_path) -> Tree:
    return BUILDERS[request.param](tmp_path)


def test_splits_classes_and_labels_match_what_was_written(tree):
    bundle = load_dataset(config(tree))
    named = dict(named_datasets(bundle))
    assert sorted(named) == sorted(tree.expected)
    for split, truth in tree.expected.items():
        dataset = named[split]
        assert dict(zip(dataset.paths, dataset.class_ids.tolist(), strict=True)) == truth, split
        assert dataset.labels.dtype == np.int64
        # labels index the sorted original ids
        np.testing.assert_array_equal(dataset.classes[dataset.labels], dataset.class_ids)
        assert list(dataset.classes) == sorted(dataset.classes)
    for split in bundle.tests:
        labels = (
            split.query.labels
            if split.gallery is None
            else np.concatenate([split.query.labels, split.gallery.labels])
        )
        assert sorted(set(labels.tolist())) == list(range(len(set(labels.tolist())))), "labels not 0..C-1"
        assert split.ks == KS[tree.name]
    assert [s.name for s in bundle.tests].count("test") == 1
    assert bundle.val is None
    assert bundle.info["train_images"] == len(tree.expected["train"])
    assert bundle.info["train_classes"] == len(set(tree.expected["train"].values()))
    image, label = bundle.tests[0].query[0]
    assert isinstance(image, torch.Tensor) and image.shape == (3, 8, 8) and image.dtype == torch.float32
    assert label == int(bundle.tests[0].query.labels[0])


def test_validation_is_carved_from_the_last_training_classes(tree):
    if "val" in tree.expected:
        pytest.skip("this tree brings its own val split")
    bundle = load_dataset(config(tree, val_fraction=0.5))
    train_classes = sorted(set(tree.expected["train"].values()))
    n_val = round(len(train_classes) * 0.5) or 1
    assert set(bundle.val.query.class_ids.tolist()) == set(train_classes[-n_val:])
    assert set(bundle.train.class_ids.tolist()) == set(train_classes[:-n_val])
    assert bundle.val.gallery is None
    assert bundle.info["val_images"] + bundle.info["train_images"] == len(tree.expected["train"])


def test_miniature_counts_are_reported_as_problems_not_errors(published_tree):
    tree = published_tree
    bundle = load_dataset(config(tree))
    assert any("published" in problem for problem in bundle.info["problems"])
    with pytest.raises(DatasetError, match="published"):
        load_dataset(config(tree, options={**tree.options, "expect_counts": True}))
    assert load_dataset(config(tree, options={**tree.options, "expect_counts": False})).info["problems"] == []


@pytest.mark.parametrize("builder", ["folder", "folder_csv"])
def test_a_users_folder_has_no_published_counts_to_fail_on(builder, tmp_path):
    tree = BUILDERS[builder](tmp_path)
    by_policy = {
        policy: load_dataset(config(tree, options={**tree.options, "expect_counts": policy}))
        for policy in ("auto", True, False)
    }
    for policy, bundle in by_policy.items():
        assert not any("published" in problem for problem in bundle.info["problems"]), policy
        assert bundle.info["problems"] == by_policy[False].info["problems"], policy
        assert bundle.info["train_images"] == len(tree.expected["train"]), policy
        assert bundle.info["test_images"] == len(tree.expected["test"]), policy


def write_user_folder(root: Path) -> dict[str, dict[str, str]]:
    """An image folder as a user lays one out, with what the reader must cope with: class names whose sorted
    order is neither creation nor numeric order, uneven classes, an upper-case suffix, a text file inside a
    class, a stray file beside the classes and an empty class folder. Returns split -> {image path: class}."""
    plan = {
        "train": {"b": 3, "9": 2, "10": 4, "A": 2, "c": 1},
        "test": {"yak": 2, "x": 3},
    }
    written: dict[str, dict[str, str]] = {}
    for split, classes in plan.items():
        written[split] = {}
        for name, count in classes.items():
            for k in range(count):
                suffix = (".jpg", ".png", ".JPEG")[k % 3]
                written[split][str(write_image(root / split / name / f"{k}{suffix}"))] = name
    (root / "train" / "9" / "notes.txt").write_text("labels checked by hand\n")
    (root / "train" / "README.txt").write_text("where these came from\n")
    (root / "test" / "empty").mkdir()
    return written


def folder_config(root: Path, **changes) -> DataConfig:
    return DataConfig(
        **{"name": "folder", "root": str(root), "image_size": 8, "val_fraction": 0.0, **changes}
    )


def test_folder_classes_are_its_subfolders_labelled_in_sorted_name_order(tmp_path):
    written = write_user_folder(tmp_path)
    bundle = load_dataset(folder_config(tmp_path))
    named = dict(named_datasets(bundle))
    assert sorted(named) == ["test", "train"]
    for split, truth in written.items():
        dataset = named[split]
        assert dict(zip(dataset.paths, dataset.class_ids.tolist(), strict=True)) == truth, split
        assert dataset.classes.tolist() == sorted(set(truth.values())), split  # "10" < "9" < "A" < "b" < "c"
        for path, label in zip(dataset.paths, dataset.labels.tolist(), strict=True):
            assert label == sorted(set(truth.values())).index(truth[path]), path
    assert sorted(bundle.info["problems"]) == sorted(
        [
            f"{tmp_path / 'train' / '9'}: 1 files without a .jpg/.jpeg/.png suffix ignored",
            f"{tmp_path / 'train' / 'README.txt'}: not inside a class folder, ignored",
            f"{tmp_path / 'test' / 'empty'}: class folder without images, ignored",
        ]
    )
    assert bundle.tests[0].gallery is None and bundle.tests[0].ks == KS["folder"]


def test_folder_validation_takes_the_last_sorted_training_classes(tmp_path):
    written = write_user_folder(tmp_path)
    bundle = load_dataset(folder_config(tmp_path, val_fraction=0.4))
    # 5 training classes sorted "10", "9", "A", "b", "c": round(5 * 0.4) = 2 go to validation
    assert set(bundle.val.query.class_ids.tolist()) == {"b", "c"}
    assert set(bundle.train.class_ids.tolist()) == {"10", "9", "A"}
    assert sorted(bundle.train.paths + bundle.val.query.paths) == sorted(written["train"])
    assert set(bundle.tests[0].query.paths) == set(written["test"])


def remove_root(root: Path) -> None:
    shutil.rmtree(root)


def remove_train(root: Path) -> None:
    shutil.rmtree(root / "train")


def remove_test_images(root: Path) -> None:
    for image in (root / "test").glob("*/*"):
        image.unlink()


@pytest.mark.parametrize(
    "damage, message",
    [
        (remove_root, "folder: data.root {root} is not a directory. See {readme}."),
        (remove_train, "folder: {root}/train not found; expected {root}/train/<class>/*.jpg"),
        (remove_test_images, "folder: split 'test' from {root}/test is empty. See {readme}."),
    ],
    ids=["no root", "no train folder", "no test images"],
)
def test_folder_layout_errors_name_the_path_and_the_readme(tmp_path, damage, message):
    root = tmp_path / "mine"
    write_user_folder(root)
    damage(root)
    with pytest.raises(DatasetError) as raised:
        load_dataset(folder_config(root))
    assert message.format(root=root, readme=FOLDER_README) in str(raised.value)
    assert FOLDER_README in str(raised.value)


def test_a_missing_image_names_the_file_and_the_readme(tree):
    if tree.name == "folder" and not tree.options:
        pytest.skip("an image folder lists what is there")
    missing = tree.image("train", 1)
    missing.unlink()
    with pytest.raises(DatasetError) as raised:
        load_dataset(config(tree))
    message = str(raised.value)
    assert f"1 of {len(tree.expected['train'])} images" in message
    assert str(missing) in message
    assert f"datasets/{tree.name}/README.md" in message


def test_a_damaged_list_line_names_the_file_and_line(tree):
    if tree.truncate is None:
        pytest.skip("no text list to damage")
    path, line = tree.truncate()
    with pytest.raises(DatasetError, match=rf"{re.escape(str(path))}, line {line}:"):
        load_dataset(config(tree))


def test_a_corrupt_image_names_its_file_and_can_be_skipped(tree):
    test_split = next(s for s in tree.expected if s.startswith("test"))
    truth = tree.expected[test_split]
    # a test image whose class has another image, so a stand-in exists
    bad = next(p for p, c in truth.items() if list(truth.values()).count(c) > 1)
    open(bad, "wb").write(b"\xff\xd8\xff\xe0 this is not a JPEG body")
    dataset = dict(named_datasets(load_dataset(config(tree))))[test_split]
    index = dataset.paths.index(bad)
    with pytest.raises(DatasetError, match=re.escape(bad)):
        dataset[index]
    lenient = dict(named_datasets(load_dataset(config(tree, skip_bad_images=True))))[test_split]
    image, label = lenient[index]
    assert label == lenient.labels[index]
    members = np.flatnonzero(lenient.labels == label)
    stand_in = members[members > index][0] if (members > index).any() else members[members != index][0]
    assert torch.equal(image, lenient[int(stand_in)][0])
    lenient[index]
    assert lenient.skipped == 1
