"""Two ranks on one GPU: gloo carries CUDA tensors, so two processes can share a device where NCCL refuses.
Each rank takes the Smooth-AP terms of its own half of the queries against the whole batch; the mean of the
ranks' losses and the sum of their gradients equal the single-process ones."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from losses.smooth_ap import SmoothAP

pytestmark = pytest.mark.gpu
BATCH = 256


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(BATCH, 32, generator=gen, dtype=torch.float64), dim=1)
    return emb.cuda(), (torch.arange(BATCH) % 32).cuda()


def rank_main(rank: int, port: int, folder: str) -> None:
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    dist.init_process_group("gloo", rank=rank, world_size=2)
    emb, labels = batch()
    emb.requires_grad_()
    half = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
    loss = SmoothAP(temperature=0.05, backend="torch")(emb[half], labels[half], emb, labels, half.start)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)  # a CUDA tensor through gloo
    grad = emb.grad.clone()
    dist.all_reduce(grad)
    if rank == 0:
        torch.save({"loss": total.cpu() / 2, "grad": grad.cpu() / 2}, os.path.join(folder, "ranks.pt"))
    dist.destroy_process_group()


def test_two_gloo_ranks_on_one_gpu_give_the_single_process_loss(tmp_path):
    from torch.distributed.elastic.utils.distributed import get_free_port

    mp.spawn(rank_main, args=(get_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = torch.load(tmp_path / "ranks.pt", weights_only=True)
    emb, labels = batch()
    emb.requires_grad_()
    loss = SmoothAP(temperature=0.05, backend="torch")(emb, labels)
    loss.backward()
    torch.testing.assert_close(ranks["loss"], loss.detach().cpu(), rtol=0, atol=1e-12)
    # each rank's loss is the mean over its half: the ranks' mean gradient is the whole batch's
    torch.testing.assert_close(ranks["grad"], emb.grad.cpu(), rtol=0, atol=1e-12)
