"""Training end to end on a few real Omniglot classes: determinism, exact resume, NaN handling, MLflow
contents."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

import losses
from bench.train import NonFiniteLossError, load_checkpoint, model_from_checkpoint, train_and_evaluate
from tests.helpers import InterruptAt, omniglot_experiment, tiny_omniglot


@pytest.fixture(scope="module")
def bundle():
    return tiny_omniglot(per_class=12)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def test_same_seed_twice_gives_identical_metrics_and_weights(tmp_path, bundle):
    first = train_and_evaluate(omniglot_experiment(tmp_path / "a"), bundle=bundle, progress=False)
    second = train_and_evaluate(omniglot_experiment(tmp_path / "b"), bundle=bundle, progress=False)
    assert first.test_metrics == second.test_metrics
    assert first.val_history == second.val_history
    for name, tensor in weights(first.checkpoint).items():
        assert torch.equal(tensor, weights(second.checkpoint)[name]), name
    other_seed = train_and_evaluate(
        omniglot_experiment(tmp_path / "c", "train.seed=1"), bundle=bundle, progress=False
    )
    assert other_seed.test_metrics != first.test_metrics


def test_interrupted_mid_epoch_then_resumed_matches_uninterrupted(
    tmp_path, bundle, tracking_uri, tracker, monkeypatch
):
    reference = train_and_evaluate(omniglot_experiment(tmp_path / "ref"), bundle=bundle, progress=False)

    exp = omniglot_experiment(tmp_path / "run")
    batches_per_epoch = len(bundle.train) // exp.data.batch_size
    real_get_loss = losses.get_loss
    monkeypatch.setattr(
        losses, "get_loss", lambda name, **p: InterruptAt(real_get_loss(name, **p), at=batches_per_epoch + 3)
    )
    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(exp, tracker, bundle=bundle, progress=False)
    state = load_checkpoint(Path(exp.train.checkpoint_dir) / "omniglot" / "smooth_ap-seed0" / "last.pt")
    assert state["epoch"] == 1 and not state["finished"]  # the end of epoch 1 survived the interrupt
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([tracker.experiment_id])
    assert run.info.status == "KILLED"

    with pytest.raises(
        FileExistsError, match="--resume"
    ):  # a fresh start must not overwrite the unfinished run
        train_and_evaluate(exp, tracker, bundle=bundle, progress=False)

    monkeypatch.setattr(losses, "get_loss", real_get_loss)
    resumed = train_and_evaluate(exp, tracker, bundle=bundle, resume=True, progress=False)
    assert resumed.test_metrics == reference.test_metrics
    for name, tensor in weights(reference.checkpoint).items():
        assert torch.equal(tensor, weights(resumed.checkpoint)[name]), name
    run = client.get_run(run.info.run_id)  # the same MLflow run continued, now finished
    assert resumed.run_id == run.info.run_id and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [0, 1, 2]


class NaNAfter(torch.nn.Module):
    def __init__(self, after: int = 5) -> None:
        super().__init__()
        self.after, self.calls = after, 0

    def forward(self, embeddings, labels):
        self.calls += 1
        value = (embeddings**2).sum() * 0.0 + 1.0
        return value * math.nan if self.calls > self.after else value


def test_nan_loss_stops_with_a_clear_message_and_a_failed_run(
    tmp_path, bundle, tracking_uri, tracker, monkeypatch
):
    monkeypatch.setitem(losses._REGISTRY, "nan_after", losses.make_spec("nan_after", NaNAfter))
    exp = omniglot_experiment(tmp_path, "loss.name=nan_after")
    with pytest.raises(NonFiniteLossError, match=r"nan_after became nan at epoch 1, batch 6; lower optim.lr"):
        train_and_evaluate(exp, tracker, bundle=bundle, progress=False)
    (run,) = MlflowClient(tracking_uri).search_runs([tracker.experiment_id])
    assert run.info.status == "FAILED" and "batch 6" in run.data.tags["failure"]


def test_mlflow_run_holds_config_metrics_and_checkpoint(tmp_path, bundle, tracking_uri, tracker):
    exp = omniglot_experiment(
        tmp_path, "loss.params.temperature=0.05", "tracking.uri=postgresql://me:s3cret@db/x"
    )
    result = train_and_evaluate(exp, tracker, bundle=bundle, progress=False)
    client = MlflowClient(tracking_uri)
    run = client.get_run(result.run_id)
    params, metrics = run.data.params, run.data.metrics
    assert params["loss"] == "smooth_ap" and params["dataset"] == "omniglot" and params["seed"] == "0"
    assert params["loss.params.temperature"] == "0.05" and params["optim.lr"] == str(exp.optim.lr)
    assert run.data.tags["stage"] == "train" and run.data.tags["dataset_hash"] == "tiny"
    assert "s3cret" not in str(params) and "s3cret" not in str(run.data.tags)
    for key in (
        "test/recall_at_1",
        "test/recall_at_8",
        "test/map_at_r",
        "test/r_precision",
        "peak_memory_mb",
    ):
        assert key in metrics
    assert metrics["test/recall_at_1"] == pytest.approx(result.test_metrics["test/recall_at_1"])
    for key in ("train/loss", "train/grad_norm", "val/map_at_r", "val/recall_at_1", "images_per_s"):
        assert len(client.get_metric_history(run.info.run_id, key)) == exp.train.epochs, key
    assert [h.value for h in client.get_metric_history(run.info.run_id, "val/map_at_r")] == pytest.approx(
        [h["val/map_at_r"] for h in result.val_history]
    )
    downloaded = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "dl")))
    config = yaml.safe_load((downloaded / "config.yaml").read_text())
    assert config["loss"]["params"] == {"temperature": 0.05} and "uri" not in config["tracking"]
    model, loaded_exp = model_from_checkpoint(downloaded / "checkpoint" / "last.pt")
    assert loaded_exp == exp and model.head.out_features == 16


def test_training_improves_retrieval_over_the_initial_network(tmp_path, bundle):
    from bench.evaluate import evaluate_split
    from bench.models import build_model

    exp = omniglot_experiment(tmp_path, "train.epochs=8", "optim.lr_decay_epochs=[]")
    initial = evaluate_split(
        build_model(exp.model, 1, exp.train.seed), bundle.tests[0], exp.eval, torch.device("cpu")
    )
    trained = train_and_evaluate(exp, bundle=bundle, progress=False).test_metrics
    assert trained["test/map_at_r"] > initial["test/map_at_r"] + 0.05
