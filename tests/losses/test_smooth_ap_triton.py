"""Smooth-AP's Triton kernels against the torch path in float64, on the GPU when there is one, else under
Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET before Triton is imported). Under the
interpreter, every Python float argument is rounded to fp32 as a compiled kernel rounds it, so a value that
would lose precision on the GPU loses it here too. And the kernels, compiled for sm_90 here without a GPU,
must not spill registers at any chunk size."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("triton")
ON_GPU = torch.cuda.is_available()

import losses._smooth_ap_triton as kernels  # noqa: E402
from losses.smooth_ap import SmoothAP, smooth_ap_loss_from_similarities, use_triton  # noqa: E402

DEVICE = torch.device("cuda" if ON_GPU else "cpu")


class _CompiledScalars:
    """A kernel whose launches pass Python floats as fp32, as a compiled Triton kernel receives them."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def rounded(*args, **kwargs):
            return launch(*(float(np.float32(a)) if isinstance(a, float) else a for a in args), **kwargs)

        return rounded


@pytest.fixture(autouse=True)
def compiled_scalars(monkeypatch):
    if not ON_GPU:
        for name in ("_forward_kernel", "_backward_kernel"):
            monkeypatch.setattr(kernels, name, _CompiledScalars(getattr(kernels, name)))


def shuffled_uneven_labels(seed: int) -> torch.Tensor:
    """Classes of 1 (no positive), 2, 3, 4 and 6 items, shuffled."""
    sizes = {0: 2, 1: 3, 2: 4, 3: 1, 4: 6, 5: 2}
    labels = torch.tensor([c for c, n in sizes.items() for _ in range(n)])
    return labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(seed))]


def unit_rows(rows: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(rows, 8, generator=gen, dtype=torch.float64), dim=1).to(
        dtype
    )


def loss_and_grad(sims: torch.Tensor, labels: torch.Tensor, backend: str, **kwargs):
    sims = sims.detach().clone().to(DEVICE).requires_grad_()
    loss = smooth_ap_loss_from_similarities(sims, labels.to(DEVICE), backend=backend, **kwargs)
    loss.backward()
    return loss.detach().double().cpu(), sims.grad.double().cpu()


@pytest.mark.parametrize("include_self", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_kernel_equals_torch_path_in_float64(include_self, seed):
    labels = shuffled_uneven_labels(seed)
    emb = unit_rows(labels.numel(), seed)
    sims = emb @ emb.T
    for temperature in (0.01, 0.3):
        kwargs = {"temperature": temperature, "include_self": include_self}
        loss, grad = loss_and_grad(sims, labels, "triton", **kwargs)
        ref_loss, ref_grad = loss_and_grad(sims, labels, "torch", **kwargs)
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)
        assert grad.abs().max() > 1e-3  # a gradient that is not all zero


@pytest.mark.parametrize("include_self", [False, True])
def test_float32_kernel_within_1e_6_of_float64_torch(include_self):
    labels = shuffled_uneven_labels(2)
    emb = unit_rows(labels.numel(), 2)
    sims = emb @ emb.T
    loss, grad = loss_and_grad(sims.float(), labels, "triton", temperature=0.05, include_self=include_self)
    ref_loss, ref_grad = loss_and_grad(sims, labels, "torch", temperature=0.05, include_self=include_self)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-6)


def test_rows_longer_than_a_tile(monkeypatch):
    """Small tiles, so each row is walked in several tiles and a partial last one."""
    monkeypatch.setattr(kernels, "TILE_ELEMENTS", 32)
    labels = torch.arange(45) % 9  # 9 classes x 5: 4 positives -> 16-column tiles, 3 per row
    emb = unit_rows(labels.numel(), 3)
    for include_self in (False, True):
        kwargs = {"temperature": 0.1, "include_self": include_self}
        loss, grad = loss_and_grad(emb @ emb.T, labels, "triton", **kwargs)
        ref_loss, ref_grad = loss_and_grad(emb @ emb.T, labels, "torch", **kwargs)
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("include_self", [False, True])
def test_queries_against_a_retrieval_set(include_self):
    """The queries x gallery form: queries are rows 3.. of the retrieval set, found at `query_offset`."""
    ref_labels = shuffled_uneven_labels(4).repeat(2)
    refs = unit_rows(ref_labels.numel(), 4)
    offset, rows = 3, 10
    sims = refs[offset : offset + rows] @ refs.T
    kwargs = {"temperature": 0.05, "include_self": include_self}
    kwargs |= {"ref_labels": ref_labels.to(DEVICE), "query_offset": offset}
    labels = ref_labels[offset : offset + rows]
    loss, grad = loss_and_grad(sims, labels, "triton", **kwargs)
    ref_loss, ref_grad = loss_and_grad(sims, labels, "torch", **kwargs)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)


def test_module_gradient_reaches_embeddings_alike():
    labels = shuffled_uneven_labels(5).to(DEVICE)
    grads = {}
    for backend in ("torch", "triton"):
        emb = unit_rows(labels.numel(), 5).to(DEVICE).requires_grad_()
        SmoothAP(temperature=0.02, backend=backend)(emb, labels).backward()
        grads[backend] = emb.grad.cpu()
    torch.testing.assert_close(grads["triton"], grads["torch"], rtol=0, atol=1e-12)


def test_auto_takes_triton_on_cuda_only():
    sims = torch.zeros(12, 12, device=DEVICE)
    assert use_triton("auto", sims) == ON_GPU
    assert not use_triton("torch", sims)


@pytest.mark.parametrize("include_self", [False, True])
def test_classes_larger_than_a_chunk_of_positives(monkeypatch, include_self):
    """Chunks of 4 positives: classes of 9 and 14 take several chunks, the last one partial."""
    monkeypatch.setattr(kernels, "CHUNK_POSITIVES", 4)
    monkeypatch.setattr(kernels, "TILE_ELEMENTS", 32)  # several tiles per row too
    sizes = {0: 1, 1: 2, 2: 5, 3: 9, 4: 14}
    labels = torch.tensor([c for c, n in sizes.items() for _ in range(n)])
    labels = labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(6))]
    emb = unit_rows(labels.numel(), 6)
    kwargs = {"temperature": 0.3, "include_self": include_self}
    loss, grad = loss_and_grad(emb @ emb.T, labels, "triton", **kwargs)
    ref_loss, ref_grad = loss_and_grad(emb @ emb.T, labels, "torch", **kwargs)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)


def test_compiled_for_sm90_no_chunk_size_spills_registers():
    """ptxas's report for both kernels at every BLOCK_P the launcher can choose (fp32, both include_self)."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "bench.benchmarks.triton_spills", "--capability", "90"],
        capture_output=True, text=True, env=env, timeout=1800,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout)
    assert {row["block_p"] for row in rows} == {2, 4, 8, 16, 32, 64}
    spilled = [row for row in rows if row["spill_stores"] or row["spill_loads"] or row["stack_bytes"]]
    assert not spilled, spilled


def test_triton_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    emb = unit_rows(8, 0)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        SmoothAP(backend="triton")(emb, torch.arange(8) % 2)
    with pytest.raises(ValueError, match="backend must be one of"):
        SmoothAP(backend="cuda")


class _CudaLike:
    """What `use_triton` reads of S: a CUDA tensor's flags, on the CPU where the interpreter runs kernels."""

    is_cuda = True
    device = torch.device("cpu")
    dtype = torch.float64


@pytest.fixture
def fresh_compile_check():
    from losses.smooth_ap import triton_compiles

    triton_compiles.cache_clear()
    yield
    triton_compiles.cache_clear()


def test_auto_falls_back_to_torch_with_one_warning_when_triton_cannot_compile(
    monkeypatch, fresh_compile_check
):
    """The error Triton raises on a machine without a C compiler, from the first launch."""

    class Uncompilable:
        def __getitem__(self, grid):
            raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    monkeypatch.setattr(kernels, "_forward_kernel", Uncompilable())
    with pytest.warns(RuntimeWarning, match="takes the torch path.*Failed to find C compiler") as caught:
        assert not use_triton("auto", _CudaLike())
        assert not use_triton("auto", _CudaLike())  # tried once
    assert len(caught) == 1
    with pytest.raises(RuntimeError, match="C compiler"):  # `triton` insists: the error reaches the caller
        loss_and_grad(torch.eye(4, dtype=torch.float64), torch.tensor([0, 0, 1, 1]), "triton")


def test_auto_keeps_triton_where_it_compiles(fresh_compile_check, recwarn):
    assert use_triton("auto", _CudaLike())
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
