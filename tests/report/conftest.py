"""One small but real store for every report test, built once per session.

Two final runs are trained for real (Smooth-AP and triplet, seed 0) on a tiny image folder, so they carry
checkpoints and true per-epoch histories. More final runs with known metrics and histories, ablation runs,
and two Optuna studies are written beside them the way bench.tune writes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

EXPERIMENT = "reptest"
KS = (1, 2, 4, 8)
# as bench.tune names them: after the config's name, which for triplet here differs from the MLflow
# experiment, so the report must follow the final runs' `study` tag
STUDIES = {"smooth_ap": f"{EXPERIMENT}-smooth_ap", "triplet": "other-config-triplet"}


@dataclass
class Store:
    root: Path
    uri: str
    optuna: str
    experiment: str
    data_root: Path


def write_image_folder(
    root: Path, classes: dict[str, int], images_per_class: int, rng: np.random.Generator
) -> None:
    """`root/<split>/<class>/*.png`, the folder reader's layout; each class a distinct colour plus noise."""
    for split, count in classes.items():
        for c in range(count):
            folder = root / split / f"{split}_class{c:02d}"
            folder.mkdir(parents=True)
            base = rng.uniform(0, 255, size=3)
            for i in range(images_per_class):
                pixels = np.clip(base + rng.normal(0, 40, size=(20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def _train_real_runs(tracker, data_root: Path, checkpoints: Path) -> None:
    from bench.config import load_experiment
    from bench.train import train_and_evaluate

    for loss in ("smooth_ap", "triplet"):
        exp = load_experiment(
            "omniglot",
            [
                f"name={EXPERIMENT}",
                "data.name=folder",
                f"data.root={data_root}",
                "data.image_size=16",
                "data.batch_size=12",
                "data.samples_per_class=3",
                "data.val_fraction=0.34",
                "train.epochs=2",
                f"train.checkpoint_dir={checkpoints}",
                "eval.batch_size=64",
                "optim.lr_decay_epochs=[]",
                f"loss.name={loss}",
                f"tracking.experiment={EXPERIMENT}",
            ],
        )
        train_and_evaluate(
            exp, tracker, device="cpu", tags={"stage": "final", "study": STUDIES[loss]}, progress=False
        )


def _log_synthetic_final(tracker, loss: str, seed: int, rng: np.random.Generator) -> None:
    run = tracker.start_run(
        f"{loss}-seed{seed}", {"stage": "final", **({"study": STUDIES[loss]} if loss in STUDIES else {})}
    )
    params = {"loss": loss, "dataset": "folder", "seed": seed, "loss.name": loss}
    if loss == "smooth_ap":
        params["loss.params.temperature"] = 0.01
    tracker.log_params(run, params)
    for epoch in range(2):
        tracker.log_metrics(
            run,
            {
                "val/map_at_r": rng.uniform(0.1, 0.6),
                "train/grad_norm": rng.uniform(0.01, 1),
                "train/loss": rng.uniform(0, 1),
            },
            step=epoch,
        )
    recall = np.sort(rng.uniform(0.3, 0.95, size=len(KS)))
    metrics = {f"test/recall_at_{k}": float(r) for k, r in zip(KS, recall, strict=True)}
    metrics.update({"test/map_at_r": rng.uniform(0.1, 0.5), "test/r_precision": rng.uniform(0.2, 0.6)})
    tracker.log_metrics(run, metrics, step=2)
    tracker.end_run(run)


def _log_ablation(tracker, rng: np.random.Generator) -> None:
    for value in (0.001, 0.01, 0.1):
        for seed in (0, 1):
            run = tracker.start_run(f"ablation-T{value}-seed{seed}", {"stage": "ablation"})
            tracker.log_params(
                run,
                {
                    "loss": "smooth_ap",
                    "dataset": "folder",
                    "seed": seed,
                    "ablation.param": "loss.params.temperature",
                    "ablation.value": value,
                },
            )
            tracker.log_metrics(
                run,
                {"test/map_at_r": rng.uniform(0.1, 0.5), "test/recall_at_1": rng.uniform(0.3, 0.9)},
                step=2,
            )
            tracker.end_run(run)


def _write_studies(storage: str) -> None:
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    space = {
        "temperature": FloatDistribution(1e-3, 1.0, log=True),
        "optim.lr": FloatDistribution(1e-4, 1e-2, log=True),
    }
    study = optuna.create_study(study_name=STUDIES["smooth_ap"], storage=storage, direction="maximize")
    rng = np.random.default_rng(3)
    for _ in range(6):
        params = {
            "temperature": float(10 ** rng.uniform(-3, 0)),
            "optim.lr": float(10 ** rng.uniform(-4, -2)),
        }
        study.add_trial(create_trial(params=params, distributions=space, value=float(rng.uniform(0.1, 0.6))))
    study.add_trial(
        create_trial(
            params={"temperature": 0.5, "optim.lr": 1e-3},
            distributions=space,
            state=TrialState.PRUNED,
            intermediate_values={0: 0.05},
        )
    )
    single = optuna.create_study(study_name=STUDIES["triplet"], storage=storage, direction="maximize")
    single.add_trial(
        create_trial(params={"optim.lr": 1e-3}, distributions={"optim.lr": space["optim.lr"]}, value=0.3)
    )


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> Store:
    import optuna

    from bench.tracking import Tracker

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    root = tmp_path_factory.mktemp("report_store")
    rng = np.random.default_rng(0)
    data_root = root / "images"
    write_image_folder(data_root, {"train": 6, "test": 4}, 6, rng)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracker = Tracker(uri, EXPERIMENT, artifact_location=str(root / "mlartifacts"))
    _train_real_runs(tracker, data_root, root / "checkpoints")
    for loss, seeds in (("smooth_ap", (1, 2)), ("triplet", (1, 2)), ("contrastive", (0,))):
        for seed in seeds:
            _log_synthetic_final(tracker, loss, seed, rng)
    stray = tracker.start_run("not-final", {"stage": "trial"})  # must not enter the tables
    tracker.log_params(stray, {"loss": "smooth_ap", "dataset": "folder", "seed": 9})
    tracker.log_metrics(stray, {"test/map_at_r": 0.99}, step=0)
    tracker.end_run(stray)
    _log_ablation(tracker, rng)
    Tracker(uri, "empty", artifact_location=str(root / "mlartifacts"))
    optuna_storage = f"sqlite:///{root / 'optuna.db'}"
    _write_studies(optuna_storage)
    return Store(root, uri, optuna_storage, EXPERIMENT, data_root)


@pytest.fixture(scope="session")
def report_dir(store) -> Path:
    """`smoothap-bench report` over the store, run once through the command line."""
    from bench.cli import main

    out = store.root / "report" / store.experiment
    assert (
        main(
            [
                "report",
                "--experiment",
                store.experiment,
                "--tracking-uri",
                store.uri,
                "--optuna-storage",
                store.optuna,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="session")
def grad_dir(store) -> Path:
    """`smoothap-bench grad` over the store, run once through the command line."""
    from bench.cli import main

    out = store.root / "report" / "grad"
    assert (
        main(["grad", "--experiment", store.experiment, "--tracking-uri", store.uri, "--out", str(out)]) == 0
    )
    return out
