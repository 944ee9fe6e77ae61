"""`smoothap-bench bench epochs`: the training images/s a real run sees, for checkouts side by side.

Each case is the real command, `python -m bench train --config C --epochs N --no-progress`, started in a
checkout's folder with that checkout first on `PYTHONPATH`, so an older commit (a `git worktree`) runs its own
code on the same data, machine and moment. Run r trains with seed r in every tree, so the metrics' spread
is seed noise. The cases alternate (tree A, tree B, tree A, ...) so that a change
in the machine's load falls on both. Every run logs `images_per_s` per epoch to its own MLflow store (all
images of the epoch over its wall time: loading, augmentation, the steps; not the validation after it), and
its test metrics, which are read back here: the speed-up and whether the numbers held, in one table.

The physical limit comes from two figures measured in the same run: the training FLOPs of one image (forward
and backward, counted by `torch.utils.flop_counter` on the run's model) and this CPU's fp32 matrix-multiply
rate at the run's thread count (a large matmul, about the best any layer can do here).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

SHOWN_METRICS = ("test/recall_at_1", "test/map_at_r", "val/map_at_r")


@dataclass
class EpochCase:
    """What every tree trains: a bundled config (or YAML path), epochs, extra `--set` overrides."""

    config: str = "omniglot"
    epochs: int = 2
    overrides: tuple[str, ...] = ()


@dataclass
class TreeResult:
    """One checkout's runs: images/s per epoch and the metrics of each run."""

    tree: Path
    label: str
    epochs: list[list[float]] = field(default_factory=list)  # per run, images/s of each epoch
    metrics: list[dict[str, float]] = field(default_factory=list)
    wall_s: list[float] = field(default_factory=list)


def tree_label(tree: Path) -> str:
    """The checkout's short commit, with `+` when it has uncommitted changes; its folder name if not git."""
    from bench.tracking.tracker import git_commit

    commit = git_commit(tree)
    if commit is None:
        return tree.name
    return commit[:7] + ("+" if commit.endswith("-dirty") else "")


def train_once(tree: Path, case: EpochCase, seed: int, store: Path) -> float:
    """Run `bench train` in `tree` against the MLflow store `store`; its wall time. A failure raises with the
    command's last output."""
    command = [sys.executable, "-m", "bench", "train", "--config", case.config, "--epochs", str(case.epochs)]
    command += ["--seed", str(seed)]
    command += ["--no-progress", "--device", "cpu", "--tracking-uri", f"sqlite:///{store}"]
    command += ["--set", f"train.checkpoint_dir={store.parent / 'checkpoints'}"]
    for override in case.overrides:
        command += ["--set", override]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    env.pop("MLFLOW_TRACKING_URI", None)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        raise RuntimeError(f"bench epochs: `bench train` failed in {tree} (exit {done.returncode}):\n{tail}")
    return time.perf_counter() - started


def read_runs(store: Path) -> list[tuple[list[float], dict[str, float]]]:
    """(images/s of each epoch, final metrics) of every run in `store`, oldest first."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments], order_by=["attributes.start_time ASC"])
    found = []
    for run in runs:
        history = client.get_metric_history(run.info.run_id, "images_per_s")
        epochs = [m.value for m in sorted(history, key=lambda m: m.step)]
        found.append((epochs, {k: run.data.metrics[k] for k in SHOWN_METRICS if k in run.data.metrics}))
    return found


def run_epoch_bench(trees: list[Path], case: EpochCase, repeats: int, progress=print) -> list[TreeResult]:
    """Train `case` with seeds 0..repeats-1 in every tree, alternating trees, and read back what each run
    logged: the metrics' spread over the seeds is the noise a change in them is measured against."""
    results = [TreeResult(tree.resolve(), tree_label(tree)) for tree in trees]
    with tempfile.TemporaryDirectory(prefix="bench-epochs-") as tmp:
        for repeat in range(repeats):
            for index, result in enumerate(results):
                store = Path(tmp) / f"tree{index}" / "mlflow.db"
                store.parent.mkdir(exist_ok=True)
                result.wall_s.append(train_once(result.tree, case, repeat, store))
                progress(f"run {repeat + 1}/{repeats} of {result.label}: {result.wall_s[-1]:.0f} s")
        for index, result in enumerate(results):
            for epochs, metrics in read_runs(Path(tmp) / f"tree{index}" / "mlflow.db"):
                result.epochs.append(epochs)
                result.metrics.append(metrics)
    return results


def table(results: list[TreeResult]) -> pd.DataFrame:
    """One row per tree: images/s over all epochs and over epochs after the first, the ratio to the first
    tree, the wall time of a run and each metric's mean and spread over the runs."""
    rows, reference = [], None
    for result in results:
        every = np.concatenate([np.asarray(e, dtype=float) for e in result.epochs])
        later = np.concatenate([np.asarray(e[1:], dtype=float) for e in result.epochs])
        mean = float(every.mean())
        reference = mean if reference is None else reference
        row = {
            "tree": result.label,
            "runs": len(result.epochs),
            "images/s": round(mean),
            "images/s after epoch 1": round(float(later.mean())) if later.size else None,
            "ratio": round(mean / reference, 2),
            "run wall s": round(float(np.mean(result.wall_s)), 1),
        }
        for key in SHOWN_METRICS:
            values = [m[key] for m in result.metrics if key in m]
            if values:
                row[key] = (
                    f"{np.mean(values):.4f} ± {np.std(values):.4f}" if len(values) > 1 else f"{values[0]:.4f}"
                )
        rows.append(row)
    return pd.DataFrame(rows)


def markdown(frame: pd.DataFrame) -> str:
    """A plain markdown table (text columns left, numbers right), empty cells for missing values."""
    numeric = [pd.api.types.is_numeric_dtype(frame[column]) for column in frame.columns]
    lines = [
        f"| {' | '.join(map(str, frame.columns))} |",
        f"|{'|'.join('---:' if n else '---' for n in numeric)}|",
    ]
    for row in frame.itertuples(index=False):
        lines.append(f"| {' | '.join('' if pd.isna(v) else str(v) for v in row)} |")
    return "\n".join(lines)


def physical_limit(case: EpochCase, threads: int) -> dict[str, float]:
    """Training FLOPs per image of `case`'s model (forward + backward, one batch) and this CPU's fp32 matmul
    rate: their ratio bounds images/s from above."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bench.config import load_experiment
    from bench.models import build_model

    exp = load_experiment(case.config)
    side, batch = exp.data.image_size, exp.data.batch_size
    channels = 1 if exp.data.name == "omniglot" else 3
    model = build_model(exp.model, channels, 0).train()
    images = torch.rand(batch, channels, side, side)
    with FlopCounterMode(display=False) as counter:
        model(images).sum().backward()
    flops_per_image = counter.get_total_flops() / batch
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.rand(2048, 2048), torch.rand(2048, 2048)
    a @ b
    passes, started = 0, time.perf_counter()
    while time.perf_counter() - started < 2.0:
        a @ b
        passes += 1
    gflops = 2 * 2048**3 * passes / (time.perf_counter() - started) / 1e9
    torch.set_num_threads(previous)
    return {
        "mflop_per_image": flops_per_image / 1e6,
        "matmul_gflops": gflops,
        "limit_images_per_s": gflops * 1e9 / flops_per_image,
    }


def format_report(results: list[TreeResult], case: EpochCase, limit: dict[str, float]) -> str:
    lines = [
        f"`bench train --config {case.config} --epochs {case.epochs}` in each tree, alternating; "
        f"images/s per epoch as the run logged it (loading, augmentation and steps; not validation).",
        "",
        markdown(table(results)),
        "",
        f"Physical limit: {limit['mflop_per_image']:.1f} MFLOP per training image (forward + backward), "
        f"{limit['matmul_gflops']:.0f} GFLOP/s for a 2048 x 2048 fp32 matmul on this CPU: at most "
        f"{limit['limit_images_per_s']:.0f} images/s if every layer ran at matmul speed.",
    ]
    return "\n".join(lines)
