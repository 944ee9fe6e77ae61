"""Under torchrun every loss is the single-process loss on any batch layout the P x K sampler produces.

The layout matrix: 2 and 3 processes (gloo, started here as torchrun would), 1 to 4 classes per rank, K from 1
to 4 over classes of uneven size (short classes are topped up with repeats), training classes carved with
`data.val_fraction` 0 and 0.2, with and without a cross-batch memory, each of the six losses and both of
Smooth-AP's `include_self` settings. Each rank takes its `RankShare` of the sampler's global batches, looks
its images' embeddings up in one fixed float64 table and runs the step's `BatchLoss` (gather, memory, rank
reduction); the independent truth is the `BatchLoss` of one process on the sampler's global batch. In float64
the rank's loss equals the global loss and its dL/dE, divided by the step's `grad_scale`, the global dL/dE's
rows, both to 1e-12: exact, so any residue in float32 is rounding.

In float32 the reported layout (2 ranks of 4 classes x 4) is checked against float32's own error: the two
forms of Smooth-AP's gradient differ by less than the square form's error against float64.

Last, the layout users reported, through the real command line: `torchrun --nproc_per_node=2 -m bench train`
against `python -m bench train` on a folder dataset; in float32 with Adam the weights agree to rounding
that Adam magnifies (see `bench.train.distributed`), far below how far they move.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

import losses
from bench.config import ModelConfig
from bench.data.samplers import PKSampler, RankShare
from bench.data.splits import carve_validation
from bench.models import build_model
from bench.train.batch_loss import batch_loss
from bench.train.distributed import Distributed
from bench.train.memory import CrossBatchMemory
from tests.helpers import write_folder_dataset
from tests.train.test_distributed import launch

ROOT = Path(__file__).resolve().parents[2]
# 30 classes of uneven size, some shorter than K: the sampler tops them up with repeats
LABELS = np.repeat(np.arange(30), [3, 5, 8, 6, 4, 7, 9, 5, 6, 8] * 3)


@dataclass(frozen=True)
class Layout:
    loss: str
    per_rank: int  # classes per rank
    k: int  # images per class
    val_fraction: float
    memory: int = 0  # cross-batch memory size (0: none)
    params: dict = field(default_factory=dict, hash=False)

    @property
    def id(self) -> str:
        extra = "".join(f"-{key}={value}" for key, value in self.params.items())
        return f"{self.loss}{extra}-{self.per_rank}x{self.k}-val{self.val_fraction}-mem{self.memory}"

    @property
    def steps(self) -> int:
        """Batches to run: 3 (the memory fills, then serves); with K = 1 past the sampler's first pass over
        the classes, where classes recur and queries meet their first positives in the memory."""
        return 3 if self.k > 1 else 8


BASE = [  # (classes per rank, K, val_fraction, memory): K = 1 has positives only in the memory
    (1, 4, 0.0, 0),
    (2, 2, 0.2, 0),
    (3, 3, 0.0, 40),
    (4, 4, 0.2, 64),
    (3, 1, 0.0, 48),
]
REPORTED = Layout("smooth_ap", 4, 4, 0.0)  # 8 classes x 4 over 2 ranks
LAYOUTS = [Layout(name, *base) for name in losses.available_losses() for base in BASE] + [
    Layout("smooth_ap", *base, params={"include_self": True}) for base in BASE
]


def embedding_table(dtype: torch.dtype) -> torch.Tensor:
    """One unit embedding per image: its class centre plus noise, so the losses see neither random nor
    separated classes."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(int(LABELS.max()) + 1, 16, generator=generator, dtype=torch.float64)
    table = centres[LABELS] + 0.8 * torch.randn(len(LABELS), 16, generator=generator, dtype=torch.float64)
    return torch.nn.functional.normalize(table, dim=1).to(dtype)


def run_layout(layout: Layout, world: int, dist: Distributed | None, dtype=torch.float64) -> list[tuple]:
    """(loss value, dL/dE / grad_scale) of this process's embeddings for each of the layout's first batches:
    the rank's share under `dist`, else the global batch."""
    train, _ = carve_validation(LABELS, layout.val_fraction)
    sampler = PKSampler(LABELS[train], world * layout.per_rank * layout.k, layout.k, seed=1)
    batches = sampler if dist is None else RankShare(sampler, dist.rank, world)
    memory = CrossBatchMemory(layout.memory) if layout.memory else None
    splits = losses.get_spec(layout.loss).capabilities.splits_by_query
    loss = batch_loss(losses.get_loss(layout.loss, **layout.params), splits, dist, memory)
    table, results = embedding_table(dtype), []
    for step, batch in zip(range(layout.steps), batches, strict=False):  # an epoch may run longer
        embeddings = table[train[batch]].clone().requires_grad_(True)
        torch.manual_seed(step)  # what a loss draws (Blackbox AP's margin); every rank takes rank 0's
        terms = loss(embeddings, torch.as_tensor(LABELS[train[batch]]), step)
        terms.backward.backward()
        results.append((terms.value, embeddings.grad / terms.grad_scale))
    return results


def _layouts_job(dist: Distributed, workdir: Path, world: int) -> None:
    torch.save(
        {
            "float64": {layout.id: run_layout(layout, world, dist) for layout in LAYOUTS},
            "float32": run_layout(REPORTED, world, dist, torch.float32),
        },
        workdir / f"rank{dist.rank}.pt",
    )


@pytest.fixture(scope="module", params=[2, 3], ids=lambda world: f"{world}proc")
def ranks(request, tmp_path_factory) -> tuple[int, list[dict]]:
    """Every layout in `request.param` processes: the world size and each rank's results."""
    world, workdir = request.param, tmp_path_factory.mktemp(f"layouts{request.param}")
    launch(_layouts_job, workdir, world, world=world)
    return world, [torch.load(workdir / f"rank{rank}.pt", weights_only=True) for rank in range(world)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.id)
def test_every_rank_gets_the_global_loss_and_its_rows_of_the_global_gradient(ranks, layout):
    world, results = ranks
    single = run_layout(layout, world, None)
    assert len(single) == layout.steps
    assert max(grad.abs().max() for _, grad in single) > 1e-4  # a real gradient, not a vanishing one
    for step, (value, grad) in enumerate(single):
        shares = [rank["float64"][layout.id][step] for rank in results]
        for share_value, _ in shares:
            assert share_value == pytest.approx(value, abs=1e-12), step
        torch.testing.assert_close(
            torch.cat([share_grad for _, share_grad in shares]), grad, rtol=0, atol=1e-12, msg=f"step {step}"
        )


def test_in_float32_the_reported_layout_differs_by_less_than_float32_rounding(ranks):
    world, results = ranks
    if world != 2:
        pytest.skip("the reported layout has 2 processes")
    truth = run_layout(REPORTED, world, None)
    single = run_layout(REPORTED, world, None, torch.float32)
    for step, ((_, exact), (_, square)) in enumerate(zip(truth, single, strict=True)):
        split = torch.cat([rank["float32"][step][1] for rank in results])
        float32_error = (square.double() - exact).abs().max()
        assert 0 < (split - square).abs().max() < float32_error, step


def train_command(tmp_path: Path, name: str, launcher: list[str]) -> Path:
    """Run `bench train` on the reported layout; its checkpoint."""
    settings = {
        "data.name": "folder",
        "data.root": str(tmp_path / "data"),
        "data.image_size": 32,
        "data.val_fraction": 0,
        "data.augment": "false",
        "data.batch_size": 32,
        "data.samples_per_class": 4,
        "model.backbone": "convnet",
        "model.embedding_dim": 32,
        "model.freeze_bn": "true",
        "optim.name": "adam",
        "optim.lr": 1e-3,
        "optim.lr_decay_epochs": "[]",
        "train.checkpoint_dir": str(tmp_path / name),
    }
    command = [*launcher, "-m", "bench", "train", "--loss", "smooth_ap", "--seed", "3", "--epochs", "1"]
    command += ["--device", "cpu", "--no-progress", "--tracking-uri", f"sqlite:///{tmp_path / name}.db"]
    command += [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / name / "omniglot" / "smooth_ap-seed3" / "last.pt"


def test_torchrun_on_the_reported_layout_trains_the_single_process_weights(tmp_path):
    # the layout: 16 train and 8 test classes of 8 grey 32 px images, each a noisy copy of its pattern
    write_folder_dataset(
        tmp_path / "data", {"train": 16, "test": 8}, 8, 32, threshold=0.5, ink=255, noise=25.5
    )
    one = torch.load(train_command(tmp_path, "one", [sys.executable]), weights_only=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    two = torch.load(train_command(tmp_path, "two", torchrun), weights_only=True)
    assert one["finished"] and two["finished"] and one["epoch"] == two["epoch"] == 1
    initial = build_model(ModelConfig("convnet", 32, freeze_bn=True), 1, seed=3).state_dict()
    weights = one["model"]
    moved = max((weights[n] - initial[n]).abs().max() for n in weights if weights[n].is_floating_point())
    parted = max((two["model"][n] - weights[n]).abs().max() for n in weights)
    assert moved > 2e-3 and parted < 5e-4, (moved, parted)
