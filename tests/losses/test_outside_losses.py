"""Losses from outside the package: a `--loss-module` file anywhere on disk, or an installed package's
`smoothap_bench.losses` entry point, join the registry, pass the project's own loss tests and a whole
`run --quick`; a broken one stops the command naming the file and the problem before any data is read."""

from __future__ import annotations

import csv
import importlib.metadata
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import losses
import tests.losses.test_loss_learning as learning_tests
import tests.losses.test_loss_registry as registry_tests
from bench.cli import build_parser, main
from bench.cli.commands import load_loss_modules
from tests.helpers import WAIT_S

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_FIRST_LINE = "# my_losses/margin_hinge.py"


def readme_example() -> str:
    """docs/losses.md's walkthrough loss, verbatim: the python block that starts with EXAMPLE_FIRST_LINE."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "losses.md").read_text(), re.S)
    found = [block for block in blocks if block.startswith(EXAMPLE_FIRST_LINE)]
    assert len(found) == 1, f"docs/losses.md should hold one python block starting {EXAMPLE_FIRST_LINE!r}"
    return found[0]


@pytest.fixture
def registry(monkeypatch):
    """Losses registered or files loaded by the test vanish with it."""
    losses.available_losses()  # the package's own modules first
    monkeypatch.setattr(losses, "_REGISTRY", dict(losses._REGISTRY))
    monkeypatch.setattr(losses, "_LOADED_FILES", {})


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder outside the repository, as a user's own project would be."""
    folder = tmp_path / "my_losses"
    folder.mkdir()
    assert not folder.resolve().is_relative_to(REPO)
    return folder


def test_readme_example_passes_the_projects_own_loss_tests(registry, outside):
    """The same test functions as tests/losses/test_loss_{registry,learning}.py, called on the docs' loss
    (they are parametrised over the registry at collection, before any file can be loaded)."""
    file = outside / "margin_hinge.py"
    file.write_text(readme_example())
    assert losses.load_loss_module(file) == ["margin_hinge"]
    registry_tests.test_builds_from_defaults("margin_hinge")
    registry_tests.test_builds_from_sampled_search_space("margin_hinge")
    registry_tests.test_defaults_are_the_constructor_signature_defaults("margin_hinge")
    learning_tests.test_loss_raises_held_out_recall("margin_hinge")


def write_image_folder(root: Path) -> None:
    """Real Omniglot characters as a `folder` dataset: 8 train, 4 val and 6 test classes of 8 images."""
    from tests.helpers import tiny_omniglot

    bundle = tiny_omniglot(train_classes=8, val_classes=4, test_classes=6, image_size=14, per_class=8)
    for split, data in (("train", bundle.train), ("val", bundle.val.query), ("test", bundle.tests[0].query)):
        for index, (ink, label) in enumerate(zip(data.images, data.labels, strict=True)):
            folder = root / split / f"class{label:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = ((1.0 - ink[0].numpy()) * 255).round().astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(folder / f"{index}.png")


def test_run_quick_tunes_trains_and_reports_a_loss_file_from_outside(
    registry, outside, tmp_path, tracking_uri, capsys
):
    file = outside / "margin_hinge.py"
    file.write_text(readme_example())
    images, out, storage = tmp_path / "images", tmp_path / "report", f"sqlite:///{tmp_path / 'optuna.db'}"
    write_image_folder(images)
    shrink = [  # seconds instead of minutes: a few classes of tiny images, one trial per loss
        "data.name=folder",
        f"data.root={images}",
        "data.image_size=8",
        "data.batch_size=16",
        "data.samples_per_class=4",
        "eval.batch_size=64",
        "tune.trials=1",
        f"train.checkpoint_dir={tmp_path / 'checkpoints'}",
        f"tracking.artifact_location={tmp_path / 'artifacts'}",
    ]
    argv = ["run", "--quick", "--losses", "smooth_ap,margin_hinge", "--loss-module", str(file)]
    argv += ["--tracking-uri", tracking_uri, "--storage", storage, "--out", str(out), "--device", "cpu"]
    argv += ["--no-progress", *(arg for override in shrink for arg in ("--set", override))]
    assert main(argv) == 0, capsys.readouterr().err

    import optuna
    from mlflow.tracking import MlflowClient

    study = optuna.load_study(study_name="omniglot-quick-margin_hinge", storage=storage)
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.COMPLETE and 0.05 <= trial.params["margin"] <= 0.45
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("omniglot-quick")
    runs = client.search_runs([experiment.experiment_id], "params.loss = 'margin_hinge'")
    assert {run.data.tags["stage"] for run in runs} == {"study", "trial", "final"}
    (final,) = [run for run in runs if run.data.tags["stage"] == "final"]
    (table,) = out.glob("comparison_*.csv")
    rows = {row["loss"]: row for row in csv.DictReader(table.open())}
    assert set(rows) == {"smooth_ap", "margin_hinge"}
    recall = float(rows["margin_hinge"]["recall_at_1_mean"])
    assert math.isclose(recall, final.data.metrics["test/recall_at_1"], rel_tol=1e-5)
    grad_rows = list(csv.DictReader((out / "grad" / "grad_by_rank.csv").open()))
    assert {row["loss"] for row in grad_rows} == {"smooth_ap", "margin_hinge"}
    assert "margin_hinge" in capsys.readouterr().out  # the printed test metrics


def loss_file(
    forward: str, name: str = "broken_loss", base: str = "torch.nn.Module", registers: str = "on import"
) -> str:
    """A loss module whose class derives from `base`, with method `forward`; it registers `name` on import
    or when its function `register_all` is called."""
    call = f"register({name!r}, MyLoss)\n"
    return (
        "import torch\n"
        "from losses import register\n"
        "\n"
        f"class MyLoss({base}):\n"
        "    def __init__(self, margin: float = 0.1):\n"
        "        super().__init__()\n"
        "        self.margin = margin\n"
        "\n"
        f"    {forward}\n"
        "\n" + (call if registers == "on import" else f"def register_all():\n    {call}")
    )


TWO_ARGS = "def forward(self, embeddings, labels):\n        return "
MEAN_SIMILARITY = TWO_ARGS + "(embeddings @ embeddings.T).mean() * self.margin"  # a valid loss, if a dull one
BROKEN = {
    "syntax error": ("import torch\n\ndef broken(:\n    pass\n", r"syntax error at line 3"),
    "import fails": (
        "import torch\nfrom losses import register\nimport no_such_module_anywhere\n",
        r"\(line 3\): ModuleNotFoundError: No module named 'no_such_module_anywhere'",
    ),
    "no register": ("import torch\n\nclass Loss(torch.nn.Module):\n    pass\n", r"registers no loss"),
    "not a module": (
        loss_file(TWO_ARGS + "embeddings.sum()", base="object"),
        r"loss 'broken_loss': MyLoss is not a torch.nn.Module subclass",
    ),
    "forward takes one argument": (
        loss_file("def forward(self, embeddings):\n        return embeddings.sum()"),
        r"loss 'broken_loss': forward must take \(embeddings, labels\)",
    ),
    "forward raises": (
        loss_file(TWO_ARGS + "embeddings[labels.max() + 100].sum()"),
        r"calling it on a batch of 16 embeddings raised IndexError",
    ),
    "per-sample values": (
        loss_file(TWO_ARGS + "embeddings.sum(1)"),
        r"forward must return a scalar float tensor, got \(16,\)",
    ),
    "not finite": (loss_file(TWO_ARGS + "embeddings.sum() / 0.0"), r"returned (-?inf|nan) on a batch"),
    "detached": (
        loss_file(TWO_ARGS + "torch.tensor(1.0)"),
        r"its value does not depend on the embeddings",
    ),
    "name taken": (
        loss_file(TWO_ARGS + "embeddings.sum()", name="triplet"),
        r"ValueError: loss 'triplet' is already registered by losses\.triplet",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_loss_file_fails_naming_the_file_and_the_problem_before_any_data(
    case, registry, outside, tmp_path, capsys
):
    source, problem = BROKEN[case]
    file = outside / "my_loss.py"
    file.write_text(source)
    before = losses.available_losses()
    argv = ["train", "--loss-module", str(file), "--set", f"data.root={tmp_path / 'no-data-here'}"]
    code = main([*argv, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {file}") and re.search(problem, err), err
    assert losses.available_losses() == before  # nothing half-registered
    assert not (tmp_path / "mlflow.db").exists()  # stopped before the tracking store, let alone the data


def test_a_clash_with_a_package_loss_is_caught_in_a_fresh_process(outside):
    """Before anything has imported the package's loss modules, as on the command line."""
    file = outside / "my_loss.py"
    file.write_text(loss_file(MEAN_SIMILARITY, name="fastap"))
    done = subprocess.run(
        [sys.executable, "-m", "bench", "report", "--loss-module", str(file)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert done.returncode == 2
    assert done.stderr == (
        f"error: {file} (line 12): ValueError: loss 'fastap' is already registered by losses.fastap\n"
    )


def test_a_file_whose_second_loss_is_broken_registers_neither(registry, outside):
    file = outside / "two.py"
    broken = loss_file(TWO_ARGS + "1", name="broken_loss").replace("MyLoss", "Second")
    file.write_text(loss_file(MEAN_SIMILARITY, name="fine_loss") + broken)
    before = losses.available_losses()
    with pytest.raises(losses.LossModuleError, match=r"loss 'broken_loss': forward must return a scalar"):
        losses.load_loss_module(file)
    assert losses.available_losses() == before


COMMANDS = {
    "train": [],
    "tune": [],
    "run": [],
    "ablate": ["--param", "loss.margin", "--values", "0.1"],
    "report": [],
    "grad": [],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_that_takes_losses_loads_loss_modules_first(command, registry, tmp_path, capsys):
    """Anything else the command would do fails differently: no data, no tracking store, no experiment."""
    missing = tmp_path / "nowhere" / "my_loss.py"
    elsewhere = ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    if command in ("report", "grad"):
        elsewhere += ["--experiment", "no-such-experiment"]
    else:
        elsewhere += ["--set", f"data.root={tmp_path / 'no-data-here'}"]
    assert main([command, *COMMANDS[command], *elsewhere, "--loss-module", str(missing)]) == 2
    assert capsys.readouterr().err == f"error: loss module {missing}: no such file\n"


def test_loss_module_is_repeatable_on_every_command_that_takes_losses(registry, outside):
    first, second = outside / "first.py", outside / "second.py"
    first.write_text(loss_file(MEAN_SIMILARITY, name="first_loss"))
    second.write_text(loss_file(MEAN_SIMILARITY, name="second_loss"))
    for command, required in COMMANDS.items():
        args = build_parser().parse_args(
            [command, *required, "--loss-module", str(first), "--loss-module", str(second)]
        )
        assert args.loss_modules == [str(first), str(second)], command
        load_loss_modules(args)  # a file already loaded is not loaded (nor registered) twice
    assert {"first_loss", "second_loss"} <= set(losses.available_losses())
    assert losses.get_spec("first_loss").cls is not losses.get_spec("second_loss").cls


def test_an_unknown_loss_points_at_loss_module():
    with pytest.raises(ValueError, match=r"unknown loss 'margin_hinge'.*--loss-module FILE"):
        losses.get_loss("margin_hinge")


def test_every_loss_of_the_package_meets_the_call_contract():
    """The contract check is no stricter than the project's own losses."""
    for name in losses.available_losses():
        losses.check_call_contract(losses.get_spec(name), "package")


@pytest.fixture
def entry_points(monkeypatch, tmp_path, registry):
    """Installed packages faked: `declare(*values)` makes importlib.metadata list those entry points of
    the group, and modules written under tmp_path importable."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def declare(*values: str) -> None:
        points = [
            importlib.metadata.EntryPoint(name=f"plugin{i}", value=value, group=losses.ENTRY_POINT_GROUP)
            for i, value in enumerate(values)
        ]

        def fake(**selection):
            assert selection == {"group": losses.ENTRY_POINT_GROUP}
            return points

        monkeypatch.setattr(importlib.metadata, "entry_points", fake)
        monkeypatch.setattr(losses, "_discovered", False)  # discovery runs again, with these

    return declare


def test_entry_points_register_a_module_and_a_callable(entry_points, tmp_path):
    package = f"plugin_{tmp_path.name}"  # unique per test: a module imported once stays imported
    (tmp_path / f"{package}_module.py").write_text(loss_file(MEAN_SIMILARITY, name="ep_imported"))
    called = loss_file(MEAN_SIMILARITY, name="ep_called", registers="when called")
    (tmp_path / f"{package}_callable.py").write_text(called)
    entry_points(f"{package}_module", f"{package}_callable:register_all")
    assert {"ep_imported", "ep_called"} <= set(losses.available_losses())
    assert losses.get_loss("ep_called", margin=0.3).margin == 0.3


def test_a_broken_entry_point_is_named(entry_points, tmp_path):
    package = f"plugin_{tmp_path.name}_empty"
    (tmp_path / f"{package}.py").write_text("X = 1\n")
    entry_points(package)
    with pytest.raises(losses.LossModuleError, match=rf"entry point plugin0 = {package}: registers no loss"):
        losses.available_losses()
