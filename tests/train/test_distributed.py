"""Training under torchrun, checked on the CPU with gloo: two processes started here (torch.multiprocessing,
with torchrun's environment variables) train through the same `process_group` as `python -m bench train`.

For each loss, two processes end with the weights of one process on the same global batches, and their first
step's gradients are one process's; gradient caching, the cross-batch memory and random augmentation compose
with it; a two-process run interrupted mid-epoch and resumed ends with the metrics of an uninterrupted one;
and the commands that cannot run under torchrun say so.

Smooth-AP with augmentation is left out on purpose: its split form computes the similarities and their
gradient with other matmuls than the square form, and that float32 rounding (about 3e-8 in dL/dE) reached
1.2e-6 in the head's bias gradient on the augmented batches, above the 1e-6 tolerance; augmentation is
loss-agnostic, so a hinge loss checks it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import losses
from bench.cli import main
from bench.data.samplers import PKSampler, RankShare
from bench.train import Hook, build_trainer, load_checkpoint, train_and_evaluate
from bench.train.distributed import Distributed, process_group
from bench.train.run import starting_point
from tests.helpers import tiny_bundle, tiny_experiment

CPU = torch.device("cpu")
WORLD = 2
RANKS_DRAW_APART = "ranks draw apart"  # not an override: rank r draws r random numbers after each step
AUGMENTED = "augmented"  # not an override: the training images are randomly shifted as they load
# (loss, config overrides): every loss plainly, then gradient caching and the memory on top of the loss that
# splits by query (Smooth-AP) and of one computed globally on every rank (Blackbox AP, which draws margins)
CASES = [(name, ()) for name in losses.available_losses()] + [
    ("smooth_ap", ("train.chunk_size=3",)),
    ("smooth_ap", ("loss.memory_size=24",)),
    ("blackbox_ap", ("loss.memory_size=24", "loss.memory_start_step=2", "train.chunk_size=4")),
    ("blackbox_ap", (RANKS_DRAW_APART,)),
    ("contrastive", (AUGMENTED,)),  # each image keeps its single-process augmentation seed
]


# PNP-D_q's alpha 4 gives the untrained tiny model a first-step gradient of about 5e-5 (the (1 + R)^-5 of
# positives ranked below many negatives), too close to rounding for the check; alpha 1 gives 4e-3
LOSS_PARAMS = {"pnp": {"alpha": 1.0}}


def case_id(case) -> str:
    name, extra = case
    return "-".join([name, *(e.split(".")[-1].replace(" ", "_") for e in extra)])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(job, *args, world: int = WORLD) -> None:
    """Run `job(dist, *args)` in `world` processes, each in the process group torchrun would give it."""
    mp.spawn(_process, args=(free_port(), world, job, args), nprocs=world, join=True)


def _process(rank: int, port: int, world: int, job, args) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    try:
        with process_group("cpu") as dist:
            job(dist, *args)
    except KeyboardInterrupt:
        pass  # what the command line does with Ctrl-C (exit status 130), after leaving the group as it does


class FirstGradients(Hook):
    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def after_step(self, trainer, step) -> None:
        if not self.grads:
            self.grads = {
                n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None
            }


class DrawApart(Hook):
    """Rank r draws r random numbers after each step, as augmentation of different images would: the ranks'
    random streams part, and only rank 0's is the single process's."""

    def after_step(self, trainer, step) -> None:
        torch.rand(trainer.dist.rank if trainer.dist is not None else 0)


def train_a_few_steps(workdir: Path, case, dist: Distributed | None) -> dict:
    """Two epochs of three global batches of 4 classes x 4 from seed 0, frozen BatchNorm."""
    name, extra = case
    overrides = [e for e in extra if e not in (RANKS_DRAW_APART, AUGMENTED)]
    # oneDNN's channels_last convolutions choose their blocking by batch size, so a rank's half batch rounds
    # apart from the whole one in float32: the plain layout leaves only what the distribution changes
    settings = [
        "model.freeze_bn=true",
        "data.augment=false",
        "train.channels_last=false",
        f"loss.name={name}",
    ]
    exp = tiny_experiment(workdir, epochs=2, extra=[*settings, *overrides])
    bundle = tiny_bundle()
    bundle.train.augment = AUGMENTED in extra
    trainer, _ = build_trainer(exp, losses.get_loss(name, **LOSS_PARAMS.get(name, {})), bundle, CPU, dist)
    recorder = FirstGradients()
    trainer.hooks = [recorder, *([DrawApart()] if RANKS_DRAW_APART in extra else [])]
    trainer.train()
    return {"weights": trainer.model.state_dict(), "grads": recorder.grads, "steps": 2 * len(trainer.loader)}


def _exactness_job(dist: Distributed, workdir: Path) -> None:
    for case in CASES:
        result = train_a_few_steps(workdir / case_id(case), case, dist)
        if dist.is_main:
            torch.save(result, workdir / f"{case_id(case)}.pt")


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("ddp")
    launch(_exactness_job, workdir)
    return workdir


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_two_processes_train_the_weights_of_one_on_the_same_global_batches(
    two_process_results, tmp_path, case
):
    single = train_a_few_steps(tmp_path, case, None)
    double = torch.load(two_process_results / f"{case_id(case)}.pt", weights_only=True)
    assert single["steps"] == double["steps"] == 6
    assert single["grads"].keys() == double["grads"].keys() and len(single["grads"]) > 2
    for name, grad in single["grads"].items():
        assert grad.abs().max() > 1e-4, name  # a real gradient, not a vanishing one
        torch.testing.assert_close(double["grads"][name], grad, rtol=0, atol=1e-6, msg=name)
    moved = max((w - single["weights"][n]).abs().max() for n, w in build_initial(tmp_path).items())
    assert moved > 1e-3
    for name, weight in single["weights"].items():
        torch.testing.assert_close(double["weights"][name], weight, rtol=0, atol=1e-5, msg=name)


def build_initial(tmp_path: Path) -> dict[str, torch.Tensor]:
    exp = tiny_experiment(tmp_path, extra=["model.freeze_bn=true"])
    return build_trainer(exp, losses.get_loss("smooth_ap"), tiny_bundle(), CPU)[0].model.state_dict()


class InterruptAt(torch.nn.Module):
    """A real loss that raises KeyboardInterrupt (Ctrl-C) on its `at`-th call, on every rank."""

    def __init__(self, inner: torch.nn.Module, at: int) -> None:
        super().__init__()
        self.inner, self.at, self.calls = inner, at, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.inner(*args, **kwargs)


def _run(dist: Distributed, workdir: Path, resume: bool) -> None:
    """What `torchrun -m bench train [--resume]` does on each rank."""
    exp = tiny_experiment(workdir, epochs=3, extra=["model.freeze_bn=true"])
    start = starting_point(exp, resume)
    dist.barrier()
    result = train_and_evaluate(exp, None, resume=start, bundle=tiny_bundle(), progress=False, dist=dist)
    if dist.is_main:
        torch.save(result.test_metrics, workdir / "test_metrics.pt")
    else:
        assert result.test_metrics == {} and result.run_id is None  # rank 0 alone evaluates


def _whole_then_interrupted_job(dist: Distributed, workdir: Path, interrupt_at: int) -> None:
    _run(dist, workdir / "whole", resume=False)
    real_get_loss = losses.get_loss
    losses.get_loss = lambda name, **params: InterruptAt(real_get_loss(name, **params), interrupt_at)
    _run(dist, workdir / "cut", resume=False)


def test_a_two_process_run_interrupted_mid_epoch_and_resumed_ends_like_an_uninterrupted_one(tmp_path):
    steps_per_epoch = len(tiny_bundle().train) // tiny_experiment(tmp_path).data.batch_size
    launch(_whole_then_interrupted_job, tmp_path, steps_per_epoch + 2)
    checkpoint = tmp_path / "cut" / "checkpoints" / "omniglot" / "smooth_ap-seed0" / "last.pt"
    state = load_checkpoint(checkpoint)
    assert state["epoch"] == 1 and not state["finished"]  # killed in epoch 2: epoch 1 is saved
    assert not (tmp_path / "cut" / "test_metrics.pt").exists()
    launch(_run, tmp_path / "cut", True)  # relaunched with --resume
    whole = torch.load(tmp_path / "whole" / "test_metrics.pt", weights_only=True)
    resumed = torch.load(tmp_path / "cut" / "test_metrics.pt", weights_only=True)
    assert whole and resumed == whole
    assert load_checkpoint(checkpoint)["finished"]


def test_each_rank_takes_whole_classes_and_the_shares_make_the_global_batch():
    labels = np.repeat(np.arange(12), 5)
    sampler = PKSampler(labels, batch_size=24, samples_per_class=4, seed=3)
    shares = [RankShare(sampler, rank, 3) for rank in range(3)]
    sampler.set_epoch(1)
    for batch, *parts in zip(sampler, *shares, strict=True):
        assert sum(parts, []) == batch
        for part in parts:
            counts = np.unique(labels[part], return_counts=True)[1]
            assert len(part) == 8 and list(counts) == [4, 4]
    with pytest.raises(
        ValueError, match=r"6 classes per batch cannot be split by whole classes over 4 processes"
    ):
        RankShare(sampler, 0, 4)


def test_sync_bn_on_the_cpu_is_a_clear_error():
    with pytest.raises(ValueError, match="train.sync_bn: SyncBatchNorm runs on CUDA only"):
        Distributed(0, 2, CPU).wrap(torch.nn.BatchNorm1d(3), sync_bn=True)


@pytest.mark.parametrize(
    "command", [["tune"], ["run", "--quick"], ["ablate", "--param", "loss.temperature", "--values", "0.1"]]
)
def test_commands_that_train_many_runs_refuse_torchrun(command, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(command) == 2
    assert f"error: `{command[0]}` does not run under torchrun (WORLD_SIZE=2)" in capsys.readouterr().err
