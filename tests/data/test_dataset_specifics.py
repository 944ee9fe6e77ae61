"""Per-dataset details: headers and count lines, the Cars196 .mat fields, In-Shop's shared query/gallery
labels, VehicleID's retrieval protocol, the published-count policy, the folder dataset's val and CSV modes,
transforms, `data check` and the data benchmark."""

from __future__ import annotations

import re

import pytest
import torch
from dataset_trees import (
    cars_tree,
    cub_tree,
    folder_csv_tree,
    folder_tree,
    inshop_tree,
    replace_line,
    sop_tree,
    vehicleid_tree,
    write_cars_annos,
    write_image,
)
from PIL import Image

from bench.config import DataConfig
from bench.data import DatasetError, load_dataset
from bench.data import sop as sop_module
from bench.data.check import check_dataset
from bench.data.readers import Published
from bench.data.transforms import IMAGENET_MEAN, IMAGENET_STD, make_transforms


def load(tree, **changes):
    values = dict(
        name=tree.name, root=str(tree.root), image_size=8, val_fraction=0.0, options=dict(tree.options)
    )
    values.update(changes)
    return load_dataset(DataConfig(**values))


def test_sop_header_is_required(tmp_path):
    tree = sop_tree(tmp_path)
    replace_line(tree.root / "Stanford_Online_Products" / "Ebay_test.txt", 1, "1 11319 1 bicycle_final/x.JPG")
    with pytest.raises(DatasetError, match=r"Ebay_test.txt, line 1: expected the header 'image_id class_id"):
        load(tree)


def test_sop_non_integer_class_names_the_line(tmp_path):
    tree = sop_tree(tmp_path)
    replace_line(tree.root / "Stanford_Online_Products" / "Ebay_train.txt", 2, "1 one 1 bicycle_final/x.JPG")
    with pytest.raises(DatasetError, match=r"Ebay_train.txt, line 2: class_id must be an integer, got 'one'"):
        load(tree)


def test_a_missing_list_file_points_to_the_readme(tmp_path):
    tree = sop_tree(tmp_path)
    (tree.root / "Stanford_Online_Products" / "Ebay_test.txt").unlink()
    with pytest.raises(DatasetError, match=r"Ebay_test.txt not found. See datasets/sop/README.md"):
        load(tree)


def test_published_counts_auto_policy(tmp_path, monkeypatch):
    """auto: a list of the published length must also have the published class count; other lengths warn."""
    tree = sop_tree(tmp_path)
    n_train, c_train = len(tree.expected["train"]), len(set(tree.expected["train"].values()))
    n_test, c_test = len(tree.expected["test"]), len(set(tree.expected["test"].values()))
    monkeypatch.setitem(sop_module.PUBLISHED, "train", Published(n_train, c_train))
    monkeypatch.setitem(sop_module.PUBLISHED, "test", Published(n_test, c_test))
    assert load(tree).info["problems"] == []
    monkeypatch.setitem(sop_module.PUBLISHED, "train", Published(n_train, c_train + 1))
    with pytest.raises(DatasetError, match=rf"sop train: found {n_train} images / {c_train} classes"):
        load(tree)
    with pytest.raises(DatasetError, match="expect_counts must be"):
        load(tree, options={"expect_counts": "sometimes"})


def test_inshop_count_line_must_match(tmp_path):
    tree = inshop_tree(tmp_path)
    listing = tree.root / "Eval" / "list_eval_partition.txt"
    replace_line(listing, 1, "52712")
    with pytest.raises(DatasetError, match=r"line 1 declares 52712 entries but 12 follow"):
        load(tree)


def test_inshop_rejects_an_unknown_status(tmp_path):
    tree = inshop_tree(tmp_path)
    listing = tree.root / "Eval" / "list_eval_partition.txt"
    line = listing.read_text().split("\n")[3]
    replace_line(listing, 4, line.replace("train", "valid"))
    with pytest.raises(DatasetError, match=r"line 4: evaluation_status must be one of train, query, gallery"):
        load(tree)


def test_inshop_query_and_gallery_share_labels(tmp_path):
    tree = inshop_tree(tmp_path)
    test = load(tree).tests[0]
    query_items = dict(zip(test.query.class_ids.tolist(), test.query.labels.tolist(), strict=True))
    gallery_items = dict(zip(test.gallery.class_ids.tolist(), test.gallery.labels.tolist(), strict=True))
    for item in set(query_items) & set(gallery_items):
        assert query_items[item] == gallery_items[item]
    assert set(gallery_items) == {"id_00000002", "id_00000007", "id_00000009"}


def test_cars_mat_without_class_field_is_named(tmp_path):
    tree = cars_tree(tmp_path)
    write_cars_annos(
        tree.root / "cars_annos.mat", [("car_ims/000001.jpg", 1, 0)], fields=("relative_im_path", "test")
    )
    with pytest.raises(DatasetError, match=r"cars_annos.mat: annotations lack the field 'class'"):
        load(tree)


def test_cars_truncated_mat_is_named(tmp_path):
    tree = cars_tree(tmp_path)
    mat = tree.root / "cars_annos.mat"
    mat.write_bytes(mat.read_bytes()[:200])
    with pytest.raises(DatasetError, match=rf"{re.escape(str(mat))}: not a readable MATLAB file"):
        load(tree)


def test_cub_label_of_unknown_class_is_named(tmp_path):
    tree = cub_tree(tmp_path)
    replace_line(tree.root / "CUB_200_2011" / "image_class_labels.txt", 2, "2 201")
    with pytest.raises(DatasetError, match=r"image_class_labels.txt, line 2: class_id 201 is not in"):
        load(tree)


def test_vehicleid_retrieval_protocol_is_leave_one_out_per_test_list(tmp_path):
    # the gallery protocol's draws are tested in test_vehicleid_draws.py
    tree = vehicleid_tree(tmp_path)
    retrieval = load(tree)
    assert [s.name for s in retrieval.tests] == ["test_small", "test_medium", "test"]
    assert all(s.gallery is None and s.draws is None for s in retrieval.tests)
    with pytest.raises(DatasetError, match="protocol must be one of"):
        load(tree, options={"protocol": "reid"})


def test_folder_uses_its_own_val_split(tmp_path):
    tree = folder_tree(tmp_path, with_val=True)
    bundle = load(tree, val_fraction=0.5)
    assert (
        dict(zip(bundle.val.query.paths, bundle.val.query.class_ids.tolist(), strict=True))
        == tree.expected["val"]
    )
    assert len(bundle.train) == len(tree.expected["train"])
    assert any("cat: 1 files without" in p for p in bundle.info["problems"])


def test_folder_without_test_dir_names_it(tmp_path):
    tree = folder_tree(tmp_path)
    for path in tree.expected["test"]:
        (tmp_path / path).unlink()
    for folder in sorted((tmp_path / "test").iterdir()):
        folder.rmdir()
    (tmp_path / "test").rmdir()
    with pytest.raises(DatasetError, match=rf"folder: {re.escape(str(tmp_path / 'test'))} not found"):
        load(tree)


def test_folder_csv_bad_split_names_the_line(tmp_path):
    tree = folder_csv_tree(tmp_path)
    replace_line(tree.root / "listing.csv", 2, "pictures/cat_train_0.jpg,cat,training")
    with pytest.raises(
        DatasetError, match=r"listing.csv, line 2: split must be one of train, val, test, got 'training'"
    ):
        load(tree)


def test_transforms_match_the_paper_pipeline():
    train, test = make_transforms(DataConfig(image_size=224))
    image = Image.new("RGB", (300, 400), (255, 128, 0))
    out = test(image)
    assert out.shape == (3, 224, 224) and train(image).shape == (3, 224, 224)
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 128, 0), IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    torch.testing.assert_close(out.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5, rtol=0)
    # Resize(256) keeps the aspect ratio: a 300x400 (w x h) image becomes 256x341, then the centre 224 is cut
    stripes = Image.new("RGB", (300, 400), (0, 0, 0))
    stripes.paste((255, 255, 255), (0, 0, 300, 200))
    rows = test(stripes)[0, :, 0]
    white, black = rows.max(), rows.min()
    assert int((rows == white).sum()) == pytest.approx(341 // 2 - (341 - 224) // 2, abs=2)
    assert black < white
    fixed_train, _ = make_transforms(DataConfig(image_size=224, augment=False))
    assert torch.equal(fixed_train(image), out)


def test_check_dataset_reports_counts_and_unreadable_images(tmp_path):
    tree = sop_tree(tmp_path)
    bad = tree.image("test", 0)
    bad.write_bytes(b"garbage")
    lines: list[str] = []
    report = check_dataset("sop", tmp_path, out=lines.append)
    assert report.splits == {"train": (3, 8), "test": (2, 5)}
    assert len(report.unreadable) == 1 and report.unreadable[0].startswith(str(bad))
    assert not report.ok
    assert any("published split has 59551 images / 11318 classes" in line for line in lines)
    assert any(line.split() == ["train", "3", "8"] for line in lines)
    missing = check_dataset("sop", tmp_path / "nowhere", out=None)
    assert missing.splits == {} and "Ebay_train.txt not found" in missing.problems[0]


def test_data_bench_counts_the_images_it_loads(tmp_path):
    from bench.benchmarks.data_bench import bench_data, synthetic_folder

    root = synthetic_folder(tmp_path, classes=4, per_class=4, side=16)
    assert len(list(root.glob("train/*/*.jpg"))) == 16
    config = DataConfig(
        name="folder", root=str(root), image_size=8, batch_size=8, samples_per_class=4, val_fraction=0
    )
    result = bench_data(config, batches=3, out=None)
    assert result["images"] == 24 and result["images_per_s"] > 0


def test_write_image_writes_decodable_files(tmp_path):
    for suffix in ("jpg", "png"):
        path = write_image(tmp_path / f"a.{suffix}")
        with Image.open(path) as image:
            assert image.size == (8, 8) and image.format == ("PNG" if suffix == "png" else "JPEG")


def test_own_image_folder_trains_and_evaluates_end_to_end(tmp_path, monkeypatch, capsys):
    from bench.benchmarks.data_bench import synthetic_folder
    from bench.cli import main

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    synthetic_folder(tmp_path / "mine", classes=6, per_class=4, side=24)
    config = tmp_path / "mine.yaml"
    config.write_text(
        f"""name: mine
data: {{name: folder, root: {tmp_path / "mine"}, image_size: 16, val_fraction: 0.34, \
batch_size: 8, samples_per_class: 4}}
model: {{backbone: convnet, embedding_dim: 8}}
train: {{epochs: 1, checkpoint_dir: {tmp_path / "ckpt"}}}
tracking: {{uri: "sqlite:///{tmp_path / "mlflow.db"}", artifact_location: {tmp_path / "art"}, \
experiment: mine}}
"""
    )
    assert main(["train", "--config", str(config), "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "recall_at_1" in out and "map_at_r" in out
    assert (tmp_path / "ckpt" / "mine" / "smooth_ap-seed0" / "last.pt").is_file()
