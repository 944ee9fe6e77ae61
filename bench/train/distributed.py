"""Training one run on several processes: `torchrun --nproc_per_node=N -m bench train ...`.

torchrun starts N processes per machine (several machines with `--nnodes` and `--rdzv-endpoint`) and gives
each one `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT`; `process_group` sets up
`torch.distributed` from them (NCCL on CUDA, one GPU per process at `cuda:LOCAL_RANK`; gloo on the CPU).

How a run is split, and why the result is the single-process run on the same global batches:
- Every rank draws the same seeded global P x K batch (`data.batch_size` is global whatever N is) and takes
  its share of whole classes (`bench.data.samplers.RankShare`), so every share is class-complete; each image
  keeps the augmentation seed it has in a single process (`bench.data.seeding`).
- The model is wrapped in DistributedDataParallel, which averages the ranks' parameter gradients.
- Every loss sees the whole global batch (`bench.train.batch_loss.GlobalBatch`). A loss that splits by query
  (`splits_by_query` on its spec, Smooth-AP) takes its own queries against the gathered batch, gathered with
  autograd: the local block stays live and the gradients every rank's loss sends to it are summed back to it.
  A rank's loss is a mean over its own counted queries (those with another item of their label among the
  items), and ranks may count different numbers (with K = 1 a query's only positives sit in the memory), so
  rank r's loss weighs n_r / n (n the global count): the weighted sum is the global loss, and its gradient,
  scaled by N n_r / n (exactly 1 when the counts are equal), reaches the local block as N times the global
  loss's. Any other loss computes the global loss on every rank from the gathered batch, in which only the
  local block is live; its gradient is multiplied by N on the way back to the local block. Either way the
  factor N compensates DDP's averaging (the factor missing in pytorch-metric-learning's issue #363). It is
  applied to gradients, never to a loss: a blackbox-differentiated loss (Blackbox AP) is not linear in the
  gradient it receives, so every rank's loss gets the single-process output gradient, 1.
- Exact in exact arithmetic, equal to rounding in float32: in float64 the N-process run's weights are the
  single-process run's to about 1e-13. In float32 the split form sums dL/dE in another order than the square
  form (its rows times the gathered batch, plus the columns' part summed over ranks, against one matmul
  (G + G^T) E), and at Smooth-AP's temperature 0.01 these sums cancel heavily: dL/dE differs by about 1e-5 of
  its size, less than float32's own error against float64. Adam's first steps move each weight by about
  lr * sign(g), so where a gradient is near zero that rounding can flip a step: weights may part by up to a
  few lr over a run, as any change of summation order would do (DDP's gradient averaging included).
- Before the loss, every rank takes rank 0's random state, so a loss that draws random numbers (Blackbox
  AP's margin) draws the same ones on every rank.
- BatchNorm in training mode keeps per-rank statistics unless `train.sync_bn` (SyncBatchNorm: the global
  batch's statistics, CUDA only); frozen BatchNorm (`model.freeze_bn`, the paper's recipe) needs neither.
- Rank 0 alone runs the hooks: it validates, tests, writes checkpoints and logs to MLflow, while the other
  ranks wait at the next collective (evaluation is rank 0's, on the plain module). Every rank resumes from
  the same checkpoint.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bench.config import ConfigError

# rank 0 validates and tests while the others wait in a collective: allow for a long evaluation
TIMEOUT = timedelta(hours=2)


def world_size_from_env() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run, and the collectives training needs."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def gather(self, local: Tensor, sum_back: bool) -> Tensor:
        """Every rank's `local` block in rank order, this rank's block live. `sum_back`: the gradients
        every rank's loss sends to a block are summed back to its owner; otherwise the other blocks are
        constants."""
        if sum_back:
            return _GatherSumBack.apply(local, self.rank, self.world_size)
        blocks = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(blocks, local.detach().contiguous())
        blocks[self.rank] = local
        return torch.cat(blocks)

    def sum(self, value: Tensor) -> Tensor:
        """The sum over ranks of a tensor (a copy; `value` is left as it is)."""
        total = value.detach().clone()
        dist.all_reduce(total)
        return total

    def total_count(self, count: int) -> int:
        """The sum over ranks of an integer count."""
        return int(self.sum(torch.tensor(count, dtype=torch.int64, device=self.device)))

    def share_random_state(self) -> None:
        """Give every rank rank 0's random state for the training device."""
        if self.device.type == "cuda":
            state = torch.cuda.get_rng_state(self.device).to(self.device)
            dist.broadcast(state, src=0)
            torch.cuda.set_rng_state(state.cpu(), self.device)
        else:
            state = torch.get_rng_state()
            dist.broadcast(state, src=0)
            torch.set_rng_state(state)

    def wrap(self, model: nn.Module, sync_bn: bool) -> nn.Module:
        """`model` in DDP (after SyncBatchNorm replaces its BatchNorm in place, with `sync_bn`)."""
        if sync_bn:
            if self.device.type != "cuda":
                raise ConfigError(
                    "train.sync_bn: SyncBatchNorm runs on CUDA only; on the CPU set it to false"
                )
            nn.SyncBatchNorm.convert_sync_batchnorm(model)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


class _GatherSumBack(torch.autograd.Function):
    """all_gather forward; backward: the sum over ranks of the gathered gradient, this rank's block."""

    @staticmethod
    def forward(ctx, local: Tensor, rank: int, world_size: int) -> Tensor:
        blocks = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(blocks, local.contiguous())
        ctx.block = slice(rank * local.shape[0], (rank + 1) * local.shape[0])
        return torch.cat(blocks)

    @staticmethod
    def backward(ctx, grad: Tensor):
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        return total[ctx.block], None, None


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.factor, None


def scale_gradient(tensor: Tensor, factor: float) -> Tensor:
    """`tensor` itself forward; its gradient times `factor` backward."""
    return _ScaleGradient.apply(tensor, factor)


def counted_queries(labels: Tensor, item_labels: Tensor) -> int:
    """The queries that a loss splitting by query averages over: those with another item of their label among
    `item_labels` (which hold the queries themselves)."""
    classes, counts = torch.unique(item_labels.reshape(-1), return_counts=True)
    return int((counts[torch.searchsorted(classes, labels.reshape(-1))] >= 2).sum())


@contextmanager
def process_group(device_type: str) -> Iterator[Distributed | None]:
    """The process group of a run launched by torchrun (None without torchrun, or with one process).

    On leaving normally every rank waits for the others (rank 0 may still be testing), then the group is
    destroyed. An error (Ctrl-C included) leaves at once without destroying it: the error's traceback still
    holds the DDP model, whose reducer must not outlive the group; torchrun stops the other ranks.
    """
    if world_size_from_env() < 2:
        yield None
        return
    rank, world_size = int(os.environ["RANK"]), world_size_from_env()
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=TIMEOUT)
    context = Distributed(rank, world_size, device)
    yield context
    context.barrier()
    gc.collect()  # a DDP model left in a reference cycle goes before the group its reducer uses
    dist.destroy_process_group()
