"""`--resume` that says what it does: changes a resumed run can honour are applied and recorded (a finished
run extended by more epochs ends exactly where a longer run from scratch ends), others are refused naming each
key, and a damaged checkpoint is one error line that leaves every store as it was."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

import losses
from bench.ablate import ablate, plan
from bench.cli import main
from bench.tracking import Tracker
from bench.train import default_checkpoint_path, holds_unfinished_run, load_checkpoint, train_and_evaluate
from bench.train.checkpoint import CheckpointError
from bench.train.resume import ResumeRefused, config_changes
from bench.train.run import starting_point
from tests.helpers import tiny_bundle, tiny_experiment

# what tiny_experiment sets that changes training, as the command line gives it
TINY_TRAINING = [
    "data.image_size=8",
    "data.batch_size=16",
    "data.samples_per_class=4",
    "data.augment=false",
    "model.embedding_dim=16",
    "eval.batch_size=64",
    "optim.lr_decay_epochs=[]",
]


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle()


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory, bundle):
    """A 2-epoch run from scratch at a constant learning rate: what every extension to 2 epochs must equal."""
    workdir = tmp_path_factory.mktemp("reference")
    return train_and_evaluate(tiny_experiment(workdir, epochs=2), bundle=bundle, progress=False)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    for name, tensor in weights(a).items():
        assert torch.equal(tensor, weights(b)[name]), name


def test_a_finished_run_extended_by_one_epoch_equals_a_longer_run_from_scratch(
    tmp_path, bundle, two_epochs, tracker, tracking_uri, capsys
):
    one = train_and_evaluate(tiny_experiment(tmp_path, epochs=1), tracker, bundle=bundle, progress=False)
    assert load_checkpoint(one.checkpoint)["finished"]
    extended = train_and_evaluate(
        tiny_experiment(tmp_path, epochs=2), tracker, bundle=bundle, resume=True, progress=False
    )
    assert extended.test_metrics == two_epochs.test_metrics != one.test_metrics
    assert extended.val_history == two_epochs.val_history
    assert_same_weights(extended.checkpoint, two_epochs.checkpoint)
    state = load_checkpoint(extended.checkpoint)
    assert (state["epoch"], state["finished"], state["config"]["train"]["epochs"]) == (2, True, 2)

    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([tracker.experiment_id])  # the same run, reopened and finished again
    assert run.info.run_id == one.run_id == extended.run_id and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [0, 1]
    assert run.data.metrics["test/map_at_r"] == two_epochs.test_metrics["test/map_at_r"]
    assert run.data.tags["resume.changes"] == "after epoch 1: train.epochs: 1 -> 2"
    assert "after epoch 1 of 2, changed: train.epochs: 1 -> 2" in capsys.readouterr().err


def test_a_schedule_step_added_in_the_future_is_applied(tmp_path, bundle):
    """1 epoch at a constant rate, then 3 epochs with a decay after the second: the resumed schedule must be
    the new one (a restored scheduler holds the old steps), so it ends as the 3-epoch run with that step."""
    decayed = ["optim.lr_decay_epochs=[2]", "optim.lr_decay_gamma=0.01"]
    scratch = train_and_evaluate(
        tiny_experiment(tmp_path / "scratch", epochs=3, extra=decayed), bundle=bundle, progress=False
    )
    constant = train_and_evaluate(
        tiny_experiment(tmp_path / "constant", epochs=3), bundle=bundle, progress=False
    )
    assert constant.test_metrics != scratch.test_metrics  # the step matters, so the test can tell
    train_and_evaluate(
        tiny_experiment(tmp_path / "run", epochs=1, extra=["optim.lr_decay_gamma=0.01"]),
        bundle=bundle,
        progress=False,
    )
    resumed = train_and_evaluate(
        tiny_experiment(tmp_path / "run", epochs=3, extra=decayed), bundle=bundle, resume=True, progress=False
    )
    assert resumed.test_metrics == scratch.test_metrics
    assert_same_weights(resumed.checkpoint, scratch.checkpoint)


class CtrlCAtFirstBatch(torch.nn.Module):
    """A loss (stateless, like smooth_ap's) whose first call is interrupted by Ctrl-C."""

    def forward(self, embeddings, labels):
        raise KeyboardInterrupt


def test_an_extension_killed_before_its_first_epoch_stays_resumable(
    tmp_path, bundle, two_epochs, monkeypatch
):
    train_and_evaluate(tiny_experiment(tmp_path, epochs=1), bundle=bundle, progress=False)
    real_get_loss = losses.get_loss
    monkeypatch.setattr(losses, "get_loss", lambda name, **params: CtrlCAtFirstBatch())
    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(tiny_experiment(tmp_path, epochs=2), bundle=bundle, resume=True, progress=False)
    monkeypatch.setattr(losses, "get_loss", real_get_loss)
    path = default_checkpoint_path(tiny_experiment(tmp_path, epochs=2))
    state = load_checkpoint(path)
    assert (state["epoch"], state["finished"], state["config"]["train"]["epochs"]) == (1, False, 2)
    assert holds_unfinished_run(path)
    with pytest.raises(FileExistsError, match="--resume"):  # not silently overwritten by a fresh start
        train_and_evaluate(tiny_experiment(tmp_path, epochs=2), bundle=bundle, progress=False)
    resumed = train_and_evaluate(
        tiny_experiment(tmp_path, epochs=2), bundle=bundle, resume=True, progress=False
    )
    assert resumed.test_metrics == two_epochs.test_metrics


def test_a_store_without_the_run_gets_a_new_run_for_the_remaining_epochs(
    tmp_path, bundle, tracker, tracking_uri, _empty_store, capsys
):
    train_and_evaluate(tiny_experiment(tmp_path, epochs=1), tracker, bundle=bundle, progress=False)
    shutil.copy(_empty_store, tmp_path / "other.db")
    other_uri = f"sqlite:///{tmp_path / 'other.db'}"
    other = Tracker(other_uri, "tiny", str(tmp_path / "other-artifacts"))
    exp = tiny_experiment(tmp_path, epochs=2, extra=[f"tracking.uri={other_uri}"])
    result = train_and_evaluate(exp, other, bundle=bundle, resume=True, progress=False)

    client = MlflowClient(other_uri)
    (run,) = client.search_runs([other.experiment_id])
    assert run.info.run_id == result.run_id and run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "2" and run.data.params["loss"] == "smooth_ap"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1]
    assert run.data.tags["resume.changes"] == "after epoch 1: train.epochs: 1 -> 2; tracking.uri changed"
    (first,) = MlflowClient(tracking_uri).search_runs([tracker.experiment_id])
    assert [
        m.step for m in MlflowClient(tracking_uri).get_metric_history(first.info.run_id, "train/loss")
    ] == [0]
    assert "is not in" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("before", "after", "keys"),
    [
        (["train.epochs=3"], ["train.epochs=5"], {"train.epochs"}),
        ([], ["eval.every_epochs=2", "eval.ks=[1,4]"], {"eval.every_epochs", "eval.ks"}),
        (["train.epochs=6"], ["train.epochs=4"], {"train.epochs"}),  # unfinished: may end sooner, not earlier
        (["optim.lr_decay_epochs=[]"], ["optim.lr_decay_epochs=[4]"], {"optim.lr_decay_epochs"}),
        (["optim.lr_decay_epochs=[2]"], ["optim.lr_decay_epochs=[2,5]"], {"optim.lr_decay_epochs"}),
        (["optim.lr_decay_epochs=[5]"], ["optim.lr_decay_epochs=[4]"], {"optim.lr_decay_epochs"}),
        (
            [],
            ["tracking.uri=sqlite:///elsewhere.db", "tracking.log_checkpoint=false"],
            {"tracking.uri", "tracking.log_checkpoint"},
        ),
        ([], ["train.checkpoint_dir=moved", "tune.trials=40"], {"train.checkpoint_dir", "tune.trials"}),
        ([], ["data.num_workers=2"], {"data.num_workers"}),
        (["model.freeze_bn=true"], ["train.chunk_size=8"], {"train.chunk_size"}),
        (["model.freeze_bn=true", "train.chunk_size=8"], ["train.chunk_size=4"], {"train.chunk_size"}),
    ],
)
def test_changes_a_resumed_run_can_honour_are_returned_after_three_epochs(tmp_path, before, after, keys):
    stored = tiny_experiment(tmp_path, extra=before)
    command = tiny_experiment(tmp_path, extra=before + after)
    changes = config_changes(stored, command, 3, tmp_path / "last.pt")
    assert {change.key for change in changes} == keys


@pytest.mark.parametrize(
    ("trained", "before", "after", "line"),
    [
        (3, ["train.epochs=5"], ["train.epochs=2"], "train.epochs: 5 -> 2 (3 epochs are already trained)"),
        (
            3,
            ["optim.lr_decay_epochs=[2]"],
            ["optim.lr_decay_epochs=[]"],
            "optim.lr_decay_epochs: [2] -> [] (steps at or before epoch 3 were already applied)",
        ),
        (
            3,
            ["optim.lr_decay_epochs=[4]"],
            ["optim.lr_decay_epochs=[3]"],
            "optim.lr_decay_epochs: [4] -> [3] (steps at or before epoch 3 were already applied)",
        ),
        (3, [], ["tracking.experiment=other"], "tracking.experiment: 'omniglot' -> 'other'"),
        (3, [], ["optim.lr_decay_gamma=0.5"], "optim.lr_decay_gamma: 0.1 -> 0.5"),
        (
            3,
            ["model.freeze_bn=false"],
            ["model.freeze_bn=false", "train.chunk_size=8"],
            "train.chunk_size: None -> 8 (BatchNorm in training mode sees each chunk's statistics)",
        ),
    ],
)
def test_each_refusal_says_why(tmp_path, trained, before, after, line):
    path = tmp_path / "last.pt"
    with pytest.raises(ResumeRefused) as refused:
        config_changes(
            tiny_experiment(tmp_path, extra=before), tiny_experiment(tmp_path, extra=after), trained, path
        )
    assert f"\n  {line}\n" in str(refused.value)


def test_a_refused_resume_lists_every_differing_key_with_both_values_and_the_ways_forward(
    tmp_path, bundle, tracker, tracking_uri
):
    run = tmp_path / "run"
    train_and_evaluate(tiny_experiment(run, epochs=1), tracker, bundle=bundle, progress=False)
    command = tiny_experiment(
        run,
        epochs=2,
        extra=[
            "model.embedding_dim=32",
            "loss.params.temperature=0.05",
            "data.batch_size=32",
            "train.seed=0",  # unchanged: not listed
            "eval.batch_size=128",  # honourable: not listed
        ],
    )
    path = default_checkpoint_path(command)
    before = {p: p.read_bytes() for p in (path, Path(tracking_uri.removeprefix("sqlite:///")))}
    with pytest.raises(ResumeRefused) as refused:
        train_and_evaluate(command, tracker, bundle=bundle, resume=True, progress=False)
    lines = str(refused.value).splitlines()
    assert (
        lines[0]
        == f"cannot resume {path}: a resumed run cannot honour these changes to its config (old -> new):"
    )
    assert sorted(lines[1:-1]) == [
        "  data.batch_size: 16 -> 32",
        "  loss.params.temperature: (absent) -> 0.05",
        "  model.embedding_dim: 16 -> 32",
    ]
    assert lines[-1] == (
        f"Either drop these changes to continue the run, or start a new run: move {path} aside "
        "or set another train.checkpoint_dir."
    )
    assert {p: p.read_bytes() for p in before} == before


def test_resume_without_a_checkpoint_says_how_it_looked(tmp_path):
    exp = tiny_experiment(tmp_path, extra=["train.seed=3"])
    with pytest.raises(FileNotFoundError) as missing:
        starting_point(exp, True)
    assert str(missing.value) == (
        f"no checkpoint at {tmp_path / 'checkpoints' / 'omniglot' / 'smooth_ap-seed3' / 'last.pt'} to resume "
        "(found by experiment name, loss and seed); name another file with --resume PATH"
    )


# ------------------------------------------------------------------ damaged checkpoints


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory, bundle) -> bytes:
    workdir = tmp_path_factory.mktemp("real")
    result = train_and_evaluate(tiny_experiment(workdir, epochs=1), bundle=bundle, progress=False)
    return result.checkpoint.read_bytes()


def truncated(path: Path, real: bytes) -> None:
    path.write_bytes(real[: len(real) // 2])


def empty(path: Path, real: bytes) -> None:
    path.write_bytes(b"")


def another_object(path: Path, real: bytes) -> None:
    path.write_bytes(pickle.dumps(Counter("another tool's file")))


def a_list(path: Path, real: bytes) -> None:
    torch.save([1, 2, 3], path)


def another_format(path: Path, real: bytes) -> None:
    path.write_bytes(real)
    state = load_checkpoint(path)
    torch.save({**state, "format": 99}, path)


DAMAGES = [truncated, empty, another_object, a_list, another_format]
PROBLEMS = {
    truncated: "cannot be read (RuntimeError: PytorchStreamReader failed reading zip archive",
    empty: "is an empty file",
    another_object: "holds pickled objects no checkpoint contains",
    a_list: "holds a list without a format",
    another_format: "has format 99; this version of smoothap-bench reads 1",
}


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def damaged_results(folder: Path, empty_store: str, damage, real: bytes) -> tuple[str, Path]:
    """`folder/results/` as a user has it when a checkpoint is damaged: an MLflow store that does not yet hold
    the `omniglot` experiment (so opening a tracker would show in its bytes), and the damaged `last.pt`."""
    (folder / "results").mkdir()
    shutil.copy(empty_store, folder / "results" / "mlflow.db")
    uri = f"sqlite:///{folder / 'results' / 'mlflow.db'}"  # absolute: MLflow caches stores by URI
    Tracker(uri, "earlier", str(folder / "results" / "mlartifacts"))
    path = Path("results/checkpoints/omniglot/smooth_ap-seed0/last.pt")
    (folder / path).parent.mkdir(parents=True)
    damage(folder / path, real)
    return uri, path


TRAIN = ["train", "--config", "omniglot", "--loss", "smooth_ap", "--no-progress"]


@pytest.mark.parametrize("resume", [[], ["--resume"]], ids=["train", "train --resume"])
@pytest.mark.parametrize("damage", DAMAGES, ids=lambda d: d.__name__)
def test_a_damaged_checkpoint_is_one_error_line_and_leaves_the_stores_unchanged(
    tmp_path, monkeypatch, capsys, _empty_store, real_checkpoint, damage, resume
):
    monkeypatch.chdir(tmp_path)
    uri, path = damaged_results(tmp_path, _empty_store, damage, real_checkpoint)
    before = listing(tmp_path / "results")

    # no data to read: a bug that let a damaged file pass would fail fast instead of training for minutes
    code = main([*TRAIN, "--tracking-uri", uri, "--set", f"data.root={tmp_path / 'no-data'}", *resume])

    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"error: checkpoint {path} {PROBLEMS[damage]}")
    assert f"move it aside (mv {path} {path}.bad)" in err and "`train --resume PATH`" in err
    assert listing(tmp_path / "results") == before


def test_the_command_prints_nothing_but_the_error_line(tmp_path, _empty_store, real_checkpoint):
    """As a user runs it, in its own process with the default stores: no warning, no traceback, one line."""
    uri, path = damaged_results(tmp_path, _empty_store, another_object, real_checkpoint)
    before = listing(tmp_path / "results")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run(
        [sys.executable, "-m", "bench", *TRAIN], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"error: checkpoint {path} {PROBLEMS[another_object]} (another tool's file?); move it aside "
        f"(mv {path} {path}.bad) to start this run afresh, or continue from another checkpoint with "
        "`train --resume PATH`"
    ]
    assert listing(tmp_path / "results") == before


def test_a_damaged_ablation_checkpoint_gives_the_same_error(tmp_path, bundle, tracker, real_checkpoint):
    exp = tiny_experiment(tmp_path, epochs=1)
    grid = {"loss.temperature": [0.05]}
    path = default_checkpoint_path(plan(exp, grid, [0])[0][0])
    path.parent.mkdir(parents=True)
    truncated(path, real_checkpoint)
    with pytest.raises(CheckpointError) as raised:
        ablate(exp, grid, tracker=tracker, seeds=[0], bundle=bundle, log=None)
    assert str(raised.value).startswith(f"checkpoint {path} {PROBLEMS[truncated]}")
    assert tracker.find_runs() == []


# ------------------------------------------------------------------ the command line


def test_train_resume_with_more_epochs_through_the_command_line(
    tmp_path, monkeypatch, capsys, bundle, two_epochs, tracking_uri
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("bench.train.run.load_dataset", lambda config: bundle)
    argv = [
        "train",
        "--config",
        "omniglot",
        "--loss",
        "smooth_ap",
        "--no-progress",
        "--tracking-uri",
        tracking_uri,
    ]
    for line in TINY_TRAINING:
        argv += ["--set", line]
    assert main([*argv, "--epochs", "1"]) == 0
    assert main([*argv, "--epochs", "2", "--resume"]) == 0
    assert "changed: train.epochs: 1 -> 2" in capsys.readouterr().err

    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("omniglot").experiment_id])
    tested = {k: v for k, v in run.data.metrics.items() if k.startswith("test/")}
    assert tested == two_epochs.test_metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [0, 1]
    assert run.data.tags["resume.changes"] == "after epoch 1: train.epochs: 1 -> 2"
