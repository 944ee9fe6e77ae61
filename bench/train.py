"""The training loop: one experiment from initial weights to test metrics, logged to MLflow.

Exactness on resume comes from two rules: a checkpoint is written after every epoch (and once before the first),
and everything random inside an epoch (batch order, augmentation) is seeded from (seed, epoch) alone. A run
killed anywhere inside epoch e therefore resumes from the end of epoch e - 1 and redraws epoch e identically.
"""

from __future__ import annotations

import math
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

import losses
from bench.config import Experiment, experiment_from_dict
from bench.data import DatasetBundle, load_dataset
from bench.data.samplers import PKSampler
from bench.evaluate import evaluate_split
from bench.models import build_model, parameter_groups

if TYPE_CHECKING:  # MLflow is imported only by callers that track, so training runs where it is absent
    from bench.tracking import Tracker

CHECKPOINT_FORMAT = 1
EpochCallback = Callable[[int, dict[str, float]], None]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run is marked FAILED and its last good checkpoint is kept."""


@dataclass
class RunResult:
    run_id: str | None
    checkpoint: Path
    epochs: int
    val_history: list[dict[str, float]] = field(default_factory=list)
    test_metrics: dict[str, float] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def default_checkpoint_path(exp: Experiment) -> Path:
    return Path(exp.train.checkpoint_dir) / exp.name / f"{exp.loss.name}-seed{exp.train.seed}" / "last.pt"


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {state.get('format')!r}, expected {CHECKPOINT_FORMAT}")
    return state


def model_from_checkpoint(path: str | Path) -> tuple[torch.nn.Module, Experiment]:
    """The trained network and its experiment, for reports and retrieval examples."""
    state = load_checkpoint(path)
    exp = experiment_from_dict(state["config"])
    model = build_model(exp.model, state["in_channels"], exp.train.seed)
    model.load_state_dict(state["model"])
    return model.eval(), exp


def _save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temporary file, then rename: a kill during the write never leaves a torn checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _set_determinism(device: torch.device) -> None:
    torch.use_deterministic_algorithms(device.type == "cpu", warn_only=True)
    torch.backends.cudnn.benchmark = device.type == "cuda"


def train_and_evaluate(
    exp: Experiment,
    tracker: Tracker | None = None,
    *,
    device: str = "auto",
    resume: bool | str | Path = False,
    epoch_callback: EpochCallback | None = None,
    evaluate_test: bool = True,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    bundle: DatasetBundle | None = None,
    progress: bool = True,
) -> RunResult:
    """Train `exp`, validate each `eval.every_epochs`, test once at the end; log everything to `tracker`.

    `resume=True` continues from the default checkpoint path, a path continues from that file.
    `epoch_callback(epoch, val_metrics)` runs after each validation; it may raise (Optuna pruning), which ends
    the run as KILLED and propagates. `bundle` lets callers reuse a dataset already read.
    """
    dev = resolve_device(device)
    _set_determinism(dev)
    checkpoint_path = default_checkpoint_path(exp) if resume in (False, True) else Path(resume)
    state = load_checkpoint(checkpoint_path) if resume else None
    if state is not None:
        exp = experiment_from_dict(state["config"])  # the checkpoint's config wins: a resume must not drift
    elif checkpoint_path.exists() and not load_checkpoint(checkpoint_path).get("finished", False):
        raise FileExistsError(
            f"{checkpoint_path} holds an unfinished run; continue it with --resume, or delete it to start over"
        )

    loss_fn = losses.get_loss(exp.loss.name, **exp.loss.params)  # before reading data: a typo fails at once
    bundle = bundle or load_dataset(exp.data)
    sample_image, _ = bundle.train[0]
    in_channels = int(sample_image.shape[0])
    model = build_model(exp.model, in_channels, exp.train.seed).to(dev)
    if dev.type == "cuda" and exp.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = loss_fn.to(dev)
    groups = parameter_groups(model, exp.optim.lr, exp.optim.head_lr)
    if list(loss_fn.parameters()):
        groups.append({"params": list(loss_fn.parameters()), "lr": exp.optim.head_lr or exp.optim.lr, "name": "loss"})
    optimizer = _make_optimizer(exp, groups)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, exp.optim.lr_decay_epochs, exp.optim.lr_decay_gamma)
    sampler = PKSampler(bundle.train.labels, exp.data.batch_size, exp.data.samples_per_class, exp.train.seed)
    loader = DataLoader(bundle.train, batch_sampler=sampler, num_workers=exp.data.num_workers,
                        pin_memory=dev.type == "cuda", persistent_workers=False)
    history: list[dict[str, float]] = []
    start_epoch = 0
    run_id = None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        loss_fn.load_state_dict(state["loss"])
        start_epoch, history, run_id = state["epoch"], list(state["history"]), state.get("run_id")

    if tracker is not None:
        if run_id:
            tracker.resume_run(run_id)
        else:
            run_id = tracker.start_run(run_name or f"{exp.loss.name}-seed{exp.train.seed}",
                                       {"stage": "train", **(tags or {})}, parent_run_id)
            _log_run_setup(tracker, run_id, exp, bundle)

    def checkpoint(epoch: int, finished: bool = False) -> dict:
        return {"format": CHECKPOINT_FORMAT, "epoch": epoch, "finished": finished, "in_channels": in_channels,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "loss": loss_fn.state_dict(), "config": exp.to_dict(),
                "history": history, "run_id": run_id}

    if state is None:
        _save_checkpoint(checkpoint_path, checkpoint(0))
    try:
        for epoch in range(start_epoch, exp.train.epochs):
            sampler.set_epoch(epoch)
            seed_everything(exp.train.seed * 100_003 + epoch)
            train_stats = _train_one_epoch(model, loss_fn, loader, optimizer, exp, dev, epoch, progress)
            scheduler.step()
            metrics = dict(train_stats)
            is_last = epoch + 1 == exp.train.epochs
            if bundle.val is not None and ((epoch + 1) % exp.eval.every_epochs == 0 or is_last):
                val_metrics = evaluate_split(model, bundle.val, exp.eval, dev, exp.data.num_workers,
                                             dev.type == "cuda" and exp.train.channels_last)
                metrics.update(val_metrics)
                history.append({"epoch": epoch, **val_metrics})
            if tracker is not None:
                tracker.log_metrics(run_id, metrics, step=epoch)
            _save_checkpoint(checkpoint_path, checkpoint(epoch + 1))
            if progress:
                shown = {k: v for k, v in metrics.items() if k in ("train/loss", "val/map_at_r", "val/recall_at_1")}
                tqdm.write(f"epoch {epoch + 1}/{exp.train.epochs} " + " ".join(f"{k}={v:.4f}" for k, v in shown.items()))
            if epoch_callback is not None and bundle.val is not None and history and history[-1]["epoch"] == epoch:
                epoch_callback(epoch, {k: v for k, v in history[-1].items() if k != "epoch"})
        test_metrics: dict[str, float] = {}
        if evaluate_test:
            for split in bundle.tests:
                test_metrics.update(evaluate_split(model, split, exp.eval, dev, exp.data.num_workers,
                                                   dev.type == "cuda" and exp.train.channels_last))
        _save_checkpoint(checkpoint_path, checkpoint(exp.train.epochs, finished=True))
        if tracker is not None:
            tracker.log_metrics(run_id, {**test_metrics, "peak_memory_mb": _peak_memory_mb(dev),
                                         "skipped_images": skipped_images(bundle)}, step=exp.train.epochs)
            if exp.tracking.log_checkpoint:
                tracker.log_artifact(run_id, checkpoint_path, "checkpoint")
            tracker.end_run(run_id, "FINISHED")
    except NonFiniteLossError as error:
        if tracker is not None:
            tracker.set_tags(run_id, {"failure": str(error)})
            tracker.end_run(run_id, "FAILED")
        raise
    except KeyboardInterrupt:
        if tracker is not None:
            tracker.end_run(run_id, "KILLED")
        print(f"\ninterrupted: resume with --resume (checkpoint {checkpoint_path})", file=sys.stderr)
        raise
    except BaseException:
        if tracker is not None:
            tracker.end_run(run_id, "KILLED" if _is_pruned(sys.exc_info()[1]) else "FAILED")
        raise
    return RunResult(run_id, checkpoint_path, exp.train.epochs, history, test_metrics)


def _is_pruned(error: BaseException | None) -> bool:
    return type(error).__name__ == "TrialPruned"


def _make_optimizer(exp: Experiment, groups: list[dict]) -> torch.optim.Optimizer:
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if exp.optim.name not in kinds:
        raise ValueError(f"optim.name: unknown {exp.optim.name!r}; available: {', '.join(kinds)}")
    return kinds[exp.optim.name](groups, lr=exp.optim.lr, weight_decay=exp.optim.weight_decay)


def _train_one_epoch(model, loss_fn, loader, optimizer, exp: Experiment, dev: torch.device, epoch: int,
                     progress: bool) -> dict[str, float]:
    """One pass of the sampler; returns mean loss, mean embedding-gradient norm and images/s."""
    model.train()
    use_amp = dev.type == "cuda" and exp.train.amp
    channels_last = dev.type == "cuda" and exp.train.channels_last
    total_loss, total_grad, n_batches, n_images = 0.0, 0.0, 0, 0
    started = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{exp.train.epochs}", disable=not progress, leave=False,
               dynamic_ncols=True)
    for images, labels in bar:
        images = images.to(dev, non_blocking=True)
        labels = labels.to(dev, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
            embeddings = model(images)
        embeddings.retain_grad()
        loss = loss_fn(embeddings.float(), labels)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"loss {exp.loss.name} became {value} at epoch {epoch + 1}, batch {n_batches + 1}; "
                f"lower optim.lr (now {exp.optim.lr}) or check the loss parameters {exp.loss.params}"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if exp.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), exp.train.grad_clip)
        optimizer.step()
        total_loss += value
        total_grad += float(embeddings.grad.norm()) if embeddings.grad is not None else 0.0
        n_batches += 1
        n_images += len(labels)
        bar.set_postfix(loss=f"{total_loss / n_batches:.4f}",
                        img_s=f"{n_images / max(time.perf_counter() - started, 1e-9):.0f}")
    elapsed = max(time.perf_counter() - started, 1e-9)
    return {"train/loss": total_loss / max(n_batches, 1), "train/grad_norm": total_grad / max(n_batches, 1),
            "images_per_s": n_images / elapsed}


def _log_run_setup(tracker: Tracker, run_id: str, exp: Experiment, bundle: DatasetBundle) -> None:
    """Params (the flattened config plus the names reports group by), dataset identity, and the YAML config."""
    tracker.log_params(run_id, loggable_params(exp))
    tracker.set_tags(run_id, {"dataset": exp.data.name, "dataset_hash": bundle.info.get("content_hash", ""),
                              "loss": exp.loss.name})
    info = {k: v for k, v in bundle.info.items() if k not in ("content_hash", "problems")}
    problems = list(bundle.info.get("problems", []))
    tracker.log_params(run_id, {**{f"data_info.{k}": v for k, v in info.items()}, "data_info.problems": len(problems)})
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
    """The flattened config plus the names reports group by (loss, dataset, seed), without store URLs: they may
    carry a server's credentials, and the run lives there anyway."""
    params = exp.flat()
    params.pop("tracking.uri", None)
    params.pop("tune.storage", None)
    params.update({"loss": exp.loss.name, "dataset": exp.data.name, "seed": exp.train.seed})
    return params


def skipped_images(bundle: DatasetBundle) -> int:
    """Corrupt images replaced under data.skip_bad_images, over every split (readers count them as they load)."""
    datasets = [bundle.train] + [s for split in [bundle.val, *bundle.tests] if split for s in (split.query, split.gallery)]
    return sum(int(getattr(d, "skipped", 0)) for d in datasets if d is not None)


def seed_everything(seed: int) -> None:
    """Seed torch and numpy's legacy global RNG (used by some third-party miners)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
