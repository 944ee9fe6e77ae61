"""The fairness receipt through the real training path, on a few real Omniglot classes (augmentation on).

Every tracked run tags a hash of its initial weights, of its batch stream and the splits it evaluated. The
tags are read back with MlflowClient, not through bench. Two losses at one seed must share the receipt,
another seed must not; issue 18's planted bugs (initial weights or sampler seeded from the loss), and
augmentation seeded from the loss, must change it and make the report refuse the comparison.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

import bench.train.run as run
import bench.train.trainer as trainer_module
import losses
from bench.data.samplers import PKSampler
from bench.models import build_model
from bench.report import make_report
from bench.report.receipt import UnfairComparison
from bench.tracking import Tracker
from bench.train import load_checkpoint, model_from_checkpoint, train_and_evaluate
from bench.train.fairness import weights_hash
from tests.helpers import InterruptAt, omniglot_experiment, tiny_omniglot

RECEIPT_TAGS = ("fairness.init_hash", "fairness.batches_hash", "fairness.batch_digests", "fairness.splits")


@pytest.fixture(scope="module")
def bundle():
    return tiny_omniglot(per_class=12)


def receipt(tracking_uri: str, run_id: str) -> dict[str, str]:
    tags = MlflowClient(tracking_uri).get_run(run_id).data.tags
    return {key.removeprefix("fairness."): tags.get(key) for key in RECEIPT_TAGS}


def train(workdir: Path, bundle, tracker, loss: str = "smooth_ap", *overrides: str, **kwargs):
    exp = omniglot_experiment(workdir, "train.epochs=2", f"loss.name={loss}", "loss.params={}", *overrides)
    return train_and_evaluate(exp, tracker, bundle=bundle, progress=False, device="cpu", **kwargs)


def test_two_losses_at_one_seed_share_the_receipt_and_another_seed_does_not(
    tmp_path, bundle, tracker, tracking_uri
):
    smooth = train(tmp_path / "a", bundle, tracker, "smooth_ap")
    triplet = train(tmp_path / "b", bundle, tracker, "triplet")
    other_seed = train(tmp_path / "c", bundle, tracker, "smooth_ap", "train.seed=1")
    first, second, third = (receipt(tracking_uri, r.run_id) for r in (smooth, triplet, other_seed))

    assert first == second
    assert first["splits"] == "val,test"
    assert len(first["batch_digests"].split(",")) == 2  # one digest per epoch
    assert third["init_hash"] != first["init_hash"]
    assert third["batches_hash"] != first["batches_hash"]
    # every epoch of the other seed draws other batches, not only the first
    assert not set(third["batch_digests"].split(",")) & set(first["batch_digests"].split(","))

    # the hash is the initial network's (as build_model makes it), not the trained one's
    exp = omniglot_experiment(tmp_path / "a")
    assert first["init_hash"] == weights_hash(build_model(exp.model, 1, 0))
    assert first["init_hash"] != weights_hash(model_from_checkpoint(smooth.checkpoint)[0])


@pytest.fixture(scope="module")
def uninterrupted(bundle, tmp_path_factory) -> dict[str, str]:
    """The receipt of a run of 3 epochs that nothing interrupted."""
    root = tmp_path_factory.mktemp("uninterrupted")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    run_id = train(
        root, bundle, Tracker(uri, "tiny", str(root / "artifacts")), "smooth_ap", "train.epochs=3"
    ).run_id
    return receipt(uri, run_id)


@pytest.mark.parametrize("lost", [None, "init_hash", "batch_digests"])
def test_a_resumed_run_ends_with_the_receipt_of_an_uninterrupted_one(
    tmp_path, bundle, tracker, tracking_uri, monkeypatch, lost, uninterrupted
):
    """Killed in the middle of epoch 2 of 3 and resumed. `lost`: a tag the first start never wrote (killed
    before it could, or its tracking server missed it). Lost initial weights are rebuilt; lost digests of
    epochs already trained cannot be, so the run ends without a batch-stream hash rather than a wrong one."""
    batches_per_epoch = len(bundle.train) // 16  # omniglot_experiment's batches of 16
    real_get_loss = losses.get_loss
    monkeypatch.setattr(
        losses, "get_loss", lambda name, **p: InterruptAt(real_get_loss(name, **p), batches_per_epoch + 3)
    )
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "run", bundle, tracker, "smooth_ap", "train.epochs=3")
    monkeypatch.setattr(losses, "get_loss", real_get_loss)
    client = MlflowClient(tracking_uri)
    (killed,) = [r for r in client.search_runs([tracker.experiment_id]) if r.info.status == "KILLED"]
    assert len(killed.data.tags["fairness.batch_digests"].split(",")) == 2  # epoch 2 had begun
    if lost:
        client.delete_tag(killed.info.run_id, f"fairness.{lost}")

    resumed = train(tmp_path / "run", bundle, tracker, "smooth_ap", "train.epochs=3", resume=True)
    assert resumed.run_id == killed.info.run_id and load_checkpoint(resumed.checkpoint)["epoch"] == 3
    expected = dict(uninterrupted)
    if lost == "batch_digests":
        expected["batches_hash"] = ""  # unchecked in the report
        expected["batch_digests"] = None
    assert receipt(tracking_uri, resumed.run_id) == expected


def train_finals(tmp_path: Path, bundle, tracker) -> list[str]:
    """Smooth-AP and triplet at seed 0, tagged as final runs; their run ids."""
    return [
        train(tmp_path / loss, bundle, tracker, loss, tags={"stage": "final"}).run_id
        for loss in ("smooth_ap", "triplet")
    ]


def refused_runs(tracking_uri: str, tmp_path: Path) -> str:
    with pytest.raises(UnfairComparison) as refusal:
        make_report(tracking_uri, "tiny", tmp_path / "report", optuna_storage=None)
    assert not (tmp_path / "report").exists()
    return str(refusal.value)


def loss_being_built(monkeypatch) -> dict[str, str]:
    """`{"name": ...}`, the loss of the run being built (build_trainer notes it), for a planted bug to seed
    from."""
    loss_now: dict[str, str] = {}
    real_build_trainer = run.build_trainer

    def build_trainer(exp, *args):
        loss_now["name"] = exp.loss.name
        return real_build_trainer(exp, *args)

    monkeypatch.setattr(run, "build_trainer", build_trainer)
    return loss_now


def test_initial_weights_seeded_from_the_loss_break_the_receipt(
    tmp_path, bundle, tracker, tracking_uri, monkeypatch
):
    """Issue 18's first planted bug: the initial weights seeded with seed + len(loss name)."""
    loss_now = loss_being_built(monkeypatch)
    real_build_model = run.build_model
    monkeypatch.setattr(
        run,
        "build_model",
        lambda config, channels, seed: real_build_model(config, channels, seed + len(loss_now["name"])),
    )
    smooth, triplet = train_finals(tmp_path, bundle, tracker)
    first, second = receipt(tracking_uri, smooth), receipt(tracking_uri, triplet)
    assert first["init_hash"] != second["init_hash"]
    assert first["batches_hash"] == second["batches_hash"]  # the batches are still shared
    message = refused_runs(tracking_uri, tmp_path)
    assert "initial weights differ" in message and smooth in message and triplet in message
    assert "batch stream differ" not in message


def test_a_sampler_seeded_from_the_loss_breaks_the_receipt(
    tmp_path, bundle, tracker, tracking_uri, monkeypatch
):
    """Issue 18's second planted bug: the batch sampler seeded from the loss."""
    loss_now = loss_being_built(monkeypatch)
    monkeypatch.setattr(
        run,
        "PKSampler",
        lambda labels, size, per_class, seed: PKSampler(
            labels, size, per_class, seed + len(loss_now["name"])
        ),
    )
    smooth, triplet = train_finals(tmp_path, bundle, tracker)
    first, second = receipt(tracking_uri, smooth), receipt(tracking_uri, triplet)
    assert first["batches_hash"] != second["batches_hash"]
    assert first["init_hash"] == second["init_hash"]
    message = refused_runs(tracking_uri, tmp_path)
    assert "batch stream differ" in message and smooth in message and triplet in message


def test_augmentation_seeded_from_the_loss_breaks_the_receipt(
    tmp_path, bundle, tracker, tracking_uri, monkeypatch
):
    """Same batches, other augmentation: the epoch's torch seed is part of the batch stream."""
    loss_now = loss_being_built(monkeypatch)
    real_seed = trainer_module.seed_everything
    monkeypatch.setattr(
        trainer_module, "seed_everything", lambda seed: real_seed(seed + len(loss_now["name"]))
    )
    smooth, triplet = train_finals(tmp_path, bundle, tracker)
    assert receipt(tracking_uri, smooth)["batches_hash"] != receipt(tracking_uri, triplet)["batches_hash"]


def final_state(result) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    return result.test_metrics, load_checkpoint(result.checkpoint)["model"]


def assert_same_run(first, second) -> None:
    (metrics_a, weights_a), (metrics_b, weights_b) = final_state(first), final_state(second)
    assert metrics_a == metrics_b
    for name, tensor in weights_a.items():
        assert torch.equal(tensor, weights_b[name]), name


def test_data_loader_workers_change_nothing_without_augmentation(tmp_path, bundle):
    steady = replace(bundle, train=bundle.train.subset(np.arange(len(bundle.train)), augment=False))
    plain = train(tmp_path / "w0", steady, None, "smooth_ap", "data.num_workers=0")
    workers = train(tmp_path / "w2", steady, None, "smooth_ap", "data.num_workers=2")
    assert_same_run(plain, workers)


@pytest.fixture(scope="module")
def augmented_with_workers(bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("workers")
    return [train(root / f"run{i}", bundle, None, "smooth_ap", "data.num_workers=2") for i in range(2)]


def test_a_run_with_data_loader_workers_repeats_itself(augmented_with_workers):
    assert_same_run(*augmented_with_workers)


def test_augmented_runs_with_and_without_workers_are_the_same(tmp_path, bundle, augmented_with_workers):
    assert_same_run(
        train(tmp_path / "w0", bundle, None, "smooth_ap", "data.num_workers=0"), augmented_with_workers[0]
    )
