"""The hooks a training run is made of: evaluation, checkpoints, MLflow, pruning, progress.

Their order in `default_hooks` is the order they act at each point: an epoch is evaluated, then saved, then
logged, then shown, and only then may a pruner stop the run (so a pruned run's last epoch is logged).
"""

from __future__ import annotations

import resource
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml
from tqdm import tqdm

from bench.config import Experiment
from bench.evaluate import evaluate_split
from bench.train.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
from bench.train.trainer import Hook, StepResult, Trainer
from bench.vocabulary import TRAIN_LOSS, VAL_MAP_AT_R, VAL_RECALL_AT_1

if TYPE_CHECKING:  # MLflow is imported only by callers that track, so training runs where it is absent
    from bench.data import DatasetBundle
    from bench.tracking import Tracker

EpochCallback = Callable[[int, dict[str, float]], None]
SHOWN_METRICS = (TRAIN_LOSS, VAL_MAP_AT_R, VAL_RECALL_AT_1)


def _evaluate(trainer: Trainer, split) -> dict[str, float]:
    dev = trainer.device
    channels_last = trainer.exp.train.channels_last
    return evaluate_split(
        trainer.model,
        split,
        trainer.exp.eval,
        dev,
        trainer.exp.data.num_workers,
        channels_last,
        amp=trainer.exp.train.amp,
    )


class EvaluationHook(Hook):
    """Validation every `eval.every_epochs` and after the last epoch; the test splits once at the end."""

    def __init__(self, evaluate_test: bool) -> None:
        self.evaluate_test = evaluate_test

    def after_epoch(self, trainer: Trainer) -> None:
        val = trainer.bundle.val
        last = trainer.epoch + 1 == trainer.epochs
        if val is not None and ((trainer.epoch + 1) % trainer.exp.eval.every_epochs == 0 or last):
            metrics = _evaluate(trainer, val)
            trainer.metrics.update(metrics)
            trainer.history.append({"epoch": trainer.epoch, **metrics})

    def after_train(self, trainer: Trainer) -> None:
        if self.evaluate_test:
            for split in trainer.bundle.tests:
                trainer.test_metrics.update(_evaluate(trainer, split))


class CheckpointHook(Hook):
    """A checkpoint before the first epoch, after every epoch, and a finished one at the end.

    A run killed anywhere inside epoch e therefore resumes from the end of epoch e - 1.
    """

    def __init__(self, path: Path, in_channels: int, resumed: bool) -> None:
        self.path, self.in_channels, self.resumed = path, in_channels, resumed

    def save(self, trainer: Trainer, epoch: int, finished: bool = False) -> None:
        state = trainer.checkpoint_state(epoch, finished)
        save_checkpoint(self.path, {"format": CHECKPOINT_FORMAT, "in_channels": self.in_channels, **state})

    def before_train(self, trainer: Trainer) -> None:
        if not self.resumed:
            self.save(trainer, 0)

    def after_epoch(self, trainer: Trainer) -> None:
        self.save(trainer, trainer.epoch + 1)

    def after_train(self, trainer: Trainer) -> None:
        self.save(trainer, trainer.epochs, finished=True)


class TrackingHook(Hook):
    """The run's setup when it starts, each epoch's metrics, and at the end the test metrics and
    checkpoint."""

    def __init__(self, tracker: Tracker, resumed: bool, checkpoint: Path) -> None:
        self.tracker, self.resumed, self.checkpoint = tracker, resumed, checkpoint

    def before_train(self, trainer: Trainer) -> None:
        if not self.resumed:
            log_run_setup(self.tracker, trainer.run_id, trainer.exp, trainer.bundle)

    def after_epoch(self, trainer: Trainer) -> None:
        self.tracker.log_metrics(trainer.run_id, trainer.metrics, step=trainer.epoch)

    def after_train(self, trainer: Trainer) -> None:
        final = {
            "peak_memory_mb": peak_memory_mb(trainer.device),
            "skipped_images": skipped_images(trainer.bundle),
        }
        self.tracker.log_metrics(trainer.run_id, {**trainer.test_metrics, **final}, step=trainer.epochs)
        if trainer.exp.tracking.log_checkpoint:
            self.tracker.log_artifact(trainer.run_id, self.checkpoint, "checkpoint")


class PruningHook(Hook):
    """Hands each validation to `callback(epoch, val_metrics)`, which may raise to stop the run (Optuna)."""

    def __init__(self, callback: EpochCallback) -> None:
        self.callback = callback

    def after_epoch(self, trainer: Trainer) -> None:
        if trainer.history and trainer.history[-1]["epoch"] == trainer.epoch:
            self.callback(trainer.epoch, {k: v for k, v in trainer.history[-1].items() if k != "epoch"})


class ProgressHook(Hook):
    """A bar over each epoch's batches (running loss, images/s) and one line per finished epoch."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def before_epoch(self, trainer: Trainer) -> None:
        self.bar = tqdm(
            total=len(trainer.loader),
            desc=f"epoch {trainer.epoch + 1}/{trainer.epochs}",
            leave=False,
            dynamic_ncols=True,
        )

    def after_step(self, trainer: Trainer, step: StepResult) -> None:
        self.bar.update(1)
        stats = trainer.stats
        self.bar.set_postfix(loss=f"{stats.loss / stats.batches:.4f}", img_s=f"{stats.images_per_s():.0f}")

    def after_epoch(self, trainer: Trainer) -> None:
        self.bar.close()
        shown = {k: v for k, v in trainer.metrics.items() if k in SHOWN_METRICS}
        line = " ".join(f"{k}={v:.4f}" for k, v in shown.items())
        tqdm.write(f"epoch {trainer.epoch + 1}/{trainer.epochs} {line}")


def log_run_setup(tracker: Tracker, run_id: str, exp: Experiment, bundle: DatasetBundle) -> None:
    """Params (the flattened config plus the names reports group by), dataset identity, and the YAML
    config."""
    tracker.log_params(run_id, loggable_params(exp))
    tracker.set_tags(
        run_id,
        {
            "dataset": exp.data.name,
            "dataset_hash": bundle.info.get("content_hash", ""),
            "loss": exp.loss.name,
        },
    )
    info = {k: v for k, v in bundle.info.items() if k not in ("content_hash", "problems")}
    problems = list(bundle.info.get("problems", []))
    tracker.log_params(
        run_id, {**{f"data_info.{k}": v for k, v in info.items()}, "data_info.problems": len(problems)}
    )
    with tempfile.TemporaryDirectory() as tmp:
        config = exp.to_dict()
        config["tracking"].pop("uri", None)
        config["tune"].pop("storage", None)
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        tracker.log_artifact(run_id, path)
        if problems:
            (Path(tmp) / "data_problems.txt").write_text("\n".join(problems) + "\n")
            tracker.log_artifact(run_id, Path(tmp) / "data_problems.txt")


def loggable_params(exp: Experiment) -> dict:
    """The flattened config plus the names reports group by (loss, dataset, seed), without store URLs: they
    may carry a server's credentials, and the run lives there anyway."""
    params = exp.flat()
    params.pop("tracking.uri", None)
    params.pop("tune.storage", None)
    params.update({"loss": exp.loss.name, "dataset": exp.data.name, "seed": exp.train.seed})
    return params


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def skipped_images(bundle: DatasetBundle) -> int:
    """Corrupt images replaced under data.skip_bad_images, over every split (readers count them as they
    load)."""
    splits = [split for split in [bundle.val, *bundle.tests] if split]
    datasets = [bundle.train] + [part for split in splits for part in (split.query, split.gallery)]
    return sum(int(getattr(d, "skipped", 0)) for d in datasets if d is not None)
