"""Smooth-AP's Triton kernels against the torch path on a GPU: every chunk count of positives from 1 to 512
in float64 (compiled, 1/T passed at S's precision), and one B = 65,536 batch in fp32."""

from __future__ import annotations

import pytest
import torch

from losses.smooth_ap import smooth_ap_loss_from_similarities

pytestmark = pytest.mark.gpu
CLASS_SIZES = (2, 3, 5, 9, 17, 33, 64, 65, 66, 129, 257, 513)  # 1..512 positives, across chunk edges


def loss_and_grad(sims: torch.Tensor, labels: torch.Tensor, backend: str, **kwargs):
    sims = sims.detach().clone().requires_grad_()
    loss = smooth_ap_loss_from_similarities(sims, labels, backend=backend, **kwargs)
    loss.backward()
    return loss.detach(), sims.grad


@pytest.mark.parametrize("include_self", [False, True])
def test_triton_equals_torch_for_1_to_512_positives_in_float64(include_self):
    gen = torch.Generator(device="cuda").manual_seed(0)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(CLASS_SIZES)]).cuda()
    labels = labels[torch.randperm(labels.numel(), device="cuda", generator=gen)]
    emb = torch.nn.functional.normalize(
        torch.randn(labels.numel(), 64, device="cuda", dtype=torch.float64, generator=gen), dim=1
    )
    sims = emb @ emb.T
    for temperature in (0.01, 0.3):
        kwargs = {"temperature": temperature, "include_self": include_self}
        loss, grad = loss_and_grad(sims, labels, "triton", **kwargs)
        ref_loss, ref_grad = loss_and_grad(sims, labels, "torch", **kwargs)
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)


def test_triton_equals_torch_at_65536_in_float32():
    batch, per_class = 65536, 4
    gen = torch.Generator(device="cuda").manual_seed(1)
    labels = torch.arange(batch // per_class, device="cuda").repeat_interleave(per_class)
    emb = torch.nn.functional.normalize(torch.randn(batch, 512, device="cuda", generator=gen), dim=1)
    sims = emb @ emb.T
    del emb
    loss, grad = loss_and_grad(sims, labels, "triton", temperature=0.01)
    torch.cuda.empty_cache()
    ref_loss, ref_grad = loss_and_grad(sims, labels, "torch", temperature=0.01)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    scale = ref_grad.abs().max()
    assert float((grad - ref_grad).abs().max() / scale) < 1e-4
