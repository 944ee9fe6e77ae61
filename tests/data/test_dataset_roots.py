"""Relative dataset roots work from any folder: missing from the working directory, they are read from the
repository's datasets/ folder (said once); missing there too, the error names every place looked in."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import bench
import bench.data
from bench.cli import main
from bench.config import DataConfig
from bench.data import DatasetError, load_dataset, resolve_root

REPOSITORY = Path(bench.__file__).resolve().parents[1]
BUNDLED = REPOSITORY / "datasets" / "omniglot"


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """A working directory outside the repository, and no root announced yet in this process."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench.data, "_ANNOUNCED", set())
    return tmp_path


@pytest.mark.parametrize("root", ["datasets/omniglot", "omniglot"])
def test_a_root_missing_here_is_read_from_the_repository_and_said_once(elsewhere, capsys, root):
    assert resolve_root(root, "omniglot") == BUNDLED
    assert resolve_root(root, "omniglot") == BUNDLED
    assert capsys.readouterr().err == f"data.root {root} is not in {elsewhere}: reading {BUNDLED}\n"


def test_a_root_present_here_wins_silently(elsewhere, capsys):
    (elsewhere / "datasets" / "omniglot").mkdir(parents=True)
    assert resolve_root("datasets/omniglot", "omniglot") == Path("datasets/omniglot")
    assert capsys.readouterr().err == ""


def test_a_missing_dataset_names_every_place_looked_in(elsewhere):
    with pytest.raises(DatasetError) as raised:
        load_dataset(DataConfig(name="sop", root="datasets/sop-copy"))
    assert str(raised.value) == (
        f"data.root datasets/sop-copy not found: looked in {elsewhere / 'datasets' / 'sop-copy'} and "
        f"{REPOSITORY / 'datasets' / 'sop-copy'}. See {REPOSITORY / 'datasets' / 'sop' / 'README.md'} "
        "for where to get it."
    )


def test_train_from_another_folder_reads_the_bundled_omniglot(elsewhere, capsys, tracking_uri):
    argv = ["train", "--config", "omniglot", "--loss", "smooth_ap", "--epochs", "1", "--no-progress"]
    small = ["data.image_size=8", "data.batch_size=512", "model.embedding_dim=8", "eval.batch_size=4096"]
    for override in small:
        argv += ["--set", override]
    assert main([*argv, "--tracking-uri", tracking_uri]) == 0
    err = capsys.readouterr().err
    assert err.count(f"reading {BUNDLED}\n") == 1

    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("omniglot").experiment_id])
    files = [BUNDLED / "images_background.npz", BUNDLED / "images_evaluation.npz"]
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in files)).hexdigest()[:16]
    assert run.info.status == "FINISHED" and run.data.tags["dataset_hash"] == digest
    assert run.data.params["data_info.test_images"] == "13180"  # the 659 evaluation classes x 20
    assert "test/map_at_r" in run.data.metrics
