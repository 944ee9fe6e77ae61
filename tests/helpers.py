"""Shared builders for fast tests: a few real Omniglot classes, a synthetic bundle, a seconds-sized
experiment.

The synthetic bundle is synthetic on purpose: each class is a fixed random ink pattern plus per-image noise,
so a model can learn it in a few batches, and building it costs milliseconds (the real Omniglot reader reads
32k images). Fixtures over these builders live in tests/conftest.py.

Tests that wait for another process wait for an event with `wait_until`, never for a fixed time: the bound
is minutes, so a busy machine makes them slower, not red.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

from bench.config import Experiment, load_experiment
from bench.data import DatasetBundle, EvalSplit
from bench.data.omniglot import FILES, TensorImages, read_npz

REPO = Path(__file__).resolve().parent.parent
OMNIGLOT = REPO / "datasets" / "omniglot"
WAIT_S = 600.0  # how long a test waits for an event before it fails: long enough for any busy machine
T = TypeVar("T")


def wait_until(
    condition: Callable[[], T],
    what: str,
    *,
    process: subprocess.Popen | None = None,
    limit: float = WAIT_S,
    poll: float = 0.2,
) -> T:
    """Poll `condition()` until it returns something truthy, and return that. Fails naming `what` after
    `limit` seconds, or at once, with its output, if `process` exits first (the event can no longer come)."""
    deadline = time.monotonic() + limit
    while True:
        found = condition()
        if found:
            return found
        if process is not None and process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            code = process.returncode
            raise AssertionError(f"waiting for {what}: the process exited with {code}:\n{output}")
        if time.monotonic() > deadline:
            raise AssertionError(f"waiting for {what}: it did not happen within {limit:.0f} s")
        time.sleep(poll)


@contextmanager
def reaped(process: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """`process` (started with start_new_session=True), killed with everything it started if it still runs
    when the block ends: a failed test leaves no worker behind."""
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def reaped_module(module: str, *arguments: object) -> AbstractContextManager[subprocess.Popen]:
    """`python -m <module> <arguments>` from the repository root in its own session, one thread, no
    progress bars, output in its stdout; reaped with everything it started when the block ends."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    command = [sys.executable, "-m", module, *map(str, arguments)]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    return reaped(subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True, **pipes))


@lru_cache(maxsize=4)
def _omniglot(split: str, image_size: int) -> TensorImages:
    images, labels = read_npz(OMNIGLOT / FILES[split], split, image_size)
    return TensorImages(images, labels)


def tiny_omniglot(
    train_classes: int = 12,
    val_classes: int = 6,
    test_classes: int = 10,
    image_size: int = 14,
    per_class: int = 20,
) -> DatasetBundle:
    """Real Omniglot images, few classes: background classes for train/val, evaluation classes for test."""
    background, evaluation = _omniglot("train", image_size), _omniglot("test", image_size)

    def take(data: TensorImages, classes: range, augment: bool) -> TensorImages:
        keep = np.flatnonzero(
            np.isin(data.labels, list(classes)) & (np.arange(len(data.labels)) % 20 < per_class)
        )
        return data.subset(keep, augment=augment)

    train = take(background, range(train_classes), True)
    val = take(background, range(train_classes, train_classes + val_classes), False)
    test = take(evaluation, range(test_classes), False)
    return DatasetBundle(
        "omniglot",
        train,
        EvalSplit("val", val),
        [EvalSplit("test", test)],
        {"content_hash": "tiny", "train_images": len(train)},
    )


def tiny_bundle(
    train_classes: int = 8,
    val_classes: int = 4,
    test_classes: int = 4,
    per_class: int = 6,
    size: int = 8,
    seed: int = 0,
) -> DatasetBundle:
    """Class-disjoint train / val / test splits of synthetic 1-channel images."""
    generator = torch.Generator().manual_seed(seed)
    total = train_classes + val_classes + test_classes
    prototypes = (torch.rand(total, 1, size, size, generator=generator) > 0.7).float()
    images = prototypes.repeat_interleave(per_class, 0)
    images = (images + 0.3 * torch.randn(images.shape, generator=generator)).clamp(0, 1)
    labels = np.repeat(np.arange(total), per_class).astype(np.int64)
    everything = TensorImages(images, labels)
    cut_val, cut_test = train_classes * per_class, (train_classes + val_classes) * per_class
    train = everything.subset(np.arange(cut_val), augment=False)
    val = everything.subset(np.arange(cut_val, cut_test), augment=False)
    test = everything.subset(np.arange(cut_test, len(labels)), augment=False)
    info = {"train_classes": train_classes, "val_classes": val_classes, "test_classes": test_classes}
    return DatasetBundle("tiny", train, EvalSplit("val", val), [EvalSplit("test", test)], info)


def tiny_experiment(
    workdir: Path, trials: int = 3, epochs: int = 2, extra: list[str] | None = None
) -> Experiment:
    """The bundled Omniglot config shrunk to seconds: 8 px, batches of 4 classes x 4 images, 16-d
    embeddings."""
    return load_experiment(
        "omniglot",
        [
            "data.image_size=8",
            "data.batch_size=16",
            "data.samples_per_class=4",
            "data.augment=false",
            "model.embedding_dim=16",
            f"train.epochs={epochs}",
            f"train.checkpoint_dir={workdir / 'checkpoints'}",
            f"tune.trials={trials}",
            # trials and final runs train for train.epochs, whatever the bundled config says
            "tune.epochs=null",
            "tune.final_epochs=null",
            f"tune.storage=sqlite:///{workdir / 'optuna.db'}",
            "tune.pruner=median",  # the counts of complete and pruned trials the tests expect
            "eval.batch_size=64",
            "optim.lr_decay_epochs=[]",
            *(extra or []),
        ],
    )


def omniglot_experiment(workdir: Path, *overrides: str) -> Experiment:
    """The bundled Omniglot config at 14 px, 16-d embeddings, batches of 4 classes x 4, 3 epochs
    (tiny_omniglot)."""
    base = [
        "data.image_size=14",
        "data.batch_size=16",
        "data.samples_per_class=4",
        "model.embedding_dim=16",
        "train.epochs=3",
        "optim.lr_decay_epochs=[2]",
        "eval.batch_size=64",
        f"train.checkpoint_dir={workdir / 'ckpt'}",
        "tracking.experiment=tiny",
    ]
    return load_experiment("omniglot", base + list(overrides))


def clustered(rng: np.random.Generator, labels: np.ndarray, dim: int, noise: float = 0.8) -> np.ndarray:
    """L2-normalised class centre plus noise: continuous values, metrics well away from 0 and 1."""
    centres = rng.standard_normal((labels.max() + 1, dim))
    x = centres[labels] + noise * rng.standard_normal((len(labels), dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class InterruptAt(torch.nn.Module):
    """Wraps a real loss and raises KeyboardInterrupt (Ctrl-C) on its `at`-th call: an `at` past an
    epoch's batches interrupts mid-epoch."""

    def __init__(self, inner: torch.nn.Module, at: int) -> None:
        super().__init__()
        self.inner, self.at, self.calls = inner, at, 0

    def forward(self, embeddings, labels):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.inner(embeddings, labels)


def write_folder_dataset(
    root: Path,
    classes: dict[str, int],
    per_class: int = 6,
    size: int = 16,
    threshold: float = 0.6,
    ink: float = 200,
    noise: float = 25,
) -> None:
    """root/<split>/<class>/<i>.png: each class a fixed random grey pattern (pixels above `threshold` of a
    uniform draw carry `ink`) plus per-image Gaussian noise of `noise` grey levels."""
    rng = np.random.default_rng(0)
    for split, count in classes.items():
        for c in range(count):
            pattern = rng.random((size, size)) > threshold
            for i in range(per_class):
                pixels = np.clip(pattern * ink + rng.normal(0, noise, (size, size)), 0, 255).astype(np.uint8)
                path = root / split / f"class{c:02d}" / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels, mode="L").save(path)
