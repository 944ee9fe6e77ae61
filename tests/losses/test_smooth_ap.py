"""Smooth-AP against an independent float64 loop over the formula, autograd, and PML's version."""

import warnings

import pytest
import torch
from pytorch_metric_learning.losses import SmoothAPLoss

from losses import get_loss
from losses.smooth_ap import SmoothAP
from tests.losses.test_ref_embeddings import smooth_ap_rows


def brute_force_loss(
    emb: torch.Tensor, labels: torch.Tensor, temperature: float, include_self: bool
) -> float:
    """1 - mean AP_q straight from the definition: the batch against itself, each query's term by the Python
    loops of `smooth_ap_rows`, averaged over the queries that have a positive."""
    rows = smooth_ap_rows(emb, labels, emb, labels, 0, temperature, include_self)
    terms = [row for row in rows if row is not None]
    return sum(terms) / len(terms)


def uneven_batch(seed: int, dim: int = 6):
    """Shuffled labels with classes of 1 to 5 members (singletons have no positive)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.repeat_interleave(torch.arange(6), torch.tensor([1, 2, 3, 5, 4, 2]))
    labels = labels[torch.randperm(labels.numel(), generator=gen)]
    emb = torch.randn(labels.numel(), dim, generator=gen, dtype=torch.float64)
    return torch.nn.functional.normalize(emb, dim=1), labels


@pytest.mark.parametrize("include_self", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_loop(include_self, seed):
    emb, labels = uneven_batch(seed)
    temperature = [0.01, 0.05, 0.3][seed]
    # a tiny chunk forces many chunks, covering the chunk boundaries
    loss = SmoothAP(temperature=temperature, include_self=include_self, chunk_elements=40)
    expected = brute_force_loss(emb, labels, temperature, include_self)
    assert abs(loss(emb, labels).item() - expected) < 1e-10


def equal_class_batch(seed: int, classes: int = 5, per_class: int = 4, dim: int = 6):
    """A shuffled P x K batch: one group holding every query, the layout training batches have."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    labels = labels[torch.randperm(labels.numel(), generator=gen)]
    emb = torch.randn(labels.numel(), dim, generator=gen, dtype=torch.float64)
    return torch.nn.functional.normalize(emb, dim=1), labels


@pytest.mark.parametrize("include_self", [False, True])
@pytest.mark.parametrize("chunk_elements", [30, 2**22])  # several blocks, recomputed; one block, reused
def test_equal_class_batch_matches_brute_force_and_gradcheck(include_self, chunk_elements):
    emb, labels = equal_class_batch(5)
    loss = SmoothAP(temperature=0.05, include_self=include_self, chunk_elements=chunk_elements)
    expected = brute_force_loss(emb, labels, 0.05, include_self)
    assert abs(loss(emb, labels).item() - expected) < 1e-10
    emb.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: loss(e, labels), (emb,))


@pytest.mark.parametrize("chunk_elements", [30, 2**22])
def test_second_backward_gives_the_same_gradient(chunk_elements):
    """retain_graph: a second backward must not find the reused sigmoids changed by the first."""
    emb, labels = uneven_batch(6)
    emb.requires_grad_(True)
    value = SmoothAP(temperature=0.05, chunk_elements=chunk_elements)(emb, labels)
    (first,) = torch.autograd.grad(value, emb, retain_graph=True)
    (second,) = torch.autograd.grad(value, emb)
    assert torch.equal(first, second)


@pytest.mark.parametrize("include_self", [False, True])
def test_gradcheck_float64(include_self):
    emb, labels = uneven_batch(3, dim=4)
    loss = SmoothAP(temperature=0.1, include_self=include_self, chunk_elements=30)
    emb.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: loss(e, labels), (emb,))


def test_gradient_does_not_depend_on_chunking():
    emb, labels = uneven_batch(4)
    grads = []
    for chunk in (17, 10**6):
        e = emb.clone().requires_grad_(True)
        SmoothAP(temperature=0.02, chunk_elements=chunk)(e, labels).backward()
        grads.append(e.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-14)


@pytest.mark.parametrize("classes", [3, 4])
def test_matches_pml_where_pml_is_right(classes):
    """PML groups by the wrong axis unless samples per class == number of classes; check that case."""
    gen = torch.Generator().manual_seed(classes)
    labels = torch.repeat_interleave(torch.arange(classes), classes)  # contiguous equal blocks, as PML needs
    emb = torch.nn.functional.normalize(
        torch.randn(labels.numel(), 5, generator=gen, dtype=torch.float64), dim=1
    )
    ours_in, pml_in = emb.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    ours = SmoothAP(temperature=0.05, include_self=True)(ours_in, labels)
    theirs = SmoothAPLoss(temperature=0.05)(pml_in, labels)
    ours.backward()
    theirs.backward()
    # PML accumulates its APs in a float32 buffer, hence float32 tolerances
    assert abs(ours.item() - theirs.item()) < 1e-6
    # PML re-normalises the embeddings, so only the gradient tangent to the unit sphere is comparable
    tangent = torch.eye(emb.shape[1], dtype=emb.dtype) - emb.unsqueeze(2) * emb.unsqueeze(1)
    ours_tangent = (tangent @ ours_in.grad.unsqueeze(2)).squeeze(2)
    torch.testing.assert_close(ours_tangent, pml_in.grad.double(), rtol=1e-4, atol=1e-6)


def test_no_positive_pair_returns_connected_zero_and_warns_once():
    emb = torch.nn.functional.normalize(torch.randn(5, 3), dim=1).requires_grad_(True)
    labels = torch.arange(5)
    loss = get_loss("smooth_ap")
    with pytest.warns(UserWarning, match="no positive pair"):
        value = loss(emb, labels)
    assert value.item() == 0.0
    value.backward()
    assert torch.equal(emb.grad, torch.zeros_like(emb))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss(emb, labels)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_is_stable(dtype):
    """Near-ties divided by a tiny temperature: finite loss and gradients, equal to the fp32 result."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(64, 16)
    labels = torch.arange(16).repeat(4)
    loss = SmoothAP(temperature=0.001)
    with torch.autocast("cpu", dtype=dtype):
        emb = torch.nn.functional.normalize(layer(x), dim=1)
        value = loss(emb, labels)
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    assert abs(value.item() - loss(emb.detach().float(), labels).item()) < 1e-6


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        SmoothAP(temperature=0.0)
    with pytest.raises(ValueError, match="embeddings"):
        SmoothAP()(torch.randn(4, 3), torch.arange(5))


def test_tf32_products_are_scoped_to_the_loss():
    from losses._similarities import cuda_matmul_precision

    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32, torch.get_float32_matmul_precision()
    with cuda_matmul_precision(True):
        # both APIs stay readable inside: a mix of them raises on the first read of the other one
        assert matmul.fp32_precision == "tf32" and matmul.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"
    assert (matmul.allow_tf32, torch.get_float32_matmul_precision()) == before
    gen = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(16, 8, generator=gen), dim=1)
    labels = torch.arange(16) % 4
    values = [SmoothAP(tf32=tf32)(emb.clone().requires_grad_(), labels) for tf32 in (False, True)]
    assert values[0].item() == values[1].item()  # TF32 is a CUDA setting: nothing changes on a CPU
    values[1].backward()
    assert (matmul.allow_tf32, torch.get_float32_matmul_precision()) == before  # the backward restores it
    previous, matmul.fp32_precision = matmul.fp32_precision, "tf32"  # a caller in TF32 by the new API
    try:
        with cuda_matmul_precision(True):
            assert matmul.fp32_precision == "tf32"
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = previous


@pytest.mark.parametrize("with_refs", [False, True])
def test_tf32_covers_every_product_forward_and_backward(with_refs):
    """Each matrix product of the loss, the backward's included, sees TF32 set (read through the legacy flag,
    which raises if the APIs were mixed); the queries x gallery form too."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[bool] = []

    class Products(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
                seen.append(torch.backends.cuda.matmul.allow_tf32)
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(1)
    emb = torch.nn.functional.normalize(torch.randn(12, 8, generator=gen), dim=1).requires_grad_()
    refs = torch.nn.functional.normalize(torch.randn(20, 8, generator=gen), dim=1).requires_grad_()
    labels, ref_labels = torch.arange(12) % 4, torch.arange(20) % 4
    with Products():
        if with_refs:
            ref_labels[4:16] = labels
            SmoothAP(tf32=True, backend="torch")(emb, labels, refs, ref_labels, 4).backward()
        else:
            SmoothAP(tf32=True, backend="torch")(emb, labels).backward()
    assert len(seen) >= 2 and all(seen)
    assert refs.grad is not None if with_refs else emb.grad is not None


def test_symmetrize_in_place_is_a_plus_a_transposed(monkeypatch):
    import losses._similarities as similarities

    monkeypatch.setattr(similarities, "SYMMETRIZE_TILE", 3)  # partial tiles, off-diagonal pairs, the diagonal
    matrix = torch.randn(8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = matrix + matrix.T
    assert similarities.symmetrize_(matrix) is matrix
    assert torch.equal(matrix, expected)


def test_gram_backward_makes_no_third_square_buffer(monkeypatch):
    """dE = (G + G^T) E, with G + G^T formed in G's memory: no op outputs another B x B matrix."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import losses._similarities as similarities

    monkeypatch.setattr(similarities, "SYMMETRIZE_TILE", 4)
    gen = torch.Generator().manual_seed(1)
    emb = torch.randn(16, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(16, 16, generator=gen, dtype=torch.float64)
    expected = (grad + grad.T) @ emb.detach()  # before the backward symmetrises `grad` in place
    squares = []

    class Squares(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.shape == (16, 16) and out.data_ptr() != grad.data_ptr():
                squares.append(str(func))
            return out

    sims = similarities.Gram.apply(emb, False)
    with Squares():
        sims.backward(grad)
    torch.testing.assert_close(emb.grad, expected, rtol=0, atol=1e-12)
    assert [op for op in squares if "view" not in op and "transpose" not in op] == []


def test_rows_of_queries_without_a_positive_get_zero_gradient():
    """The backward leaves such rows unwritten, so their buffer must start at zero, whatever memory the
    allocator hands back (freed NaNs just before)."""
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4, 5])  # classes 1, 3 and 5 have a single item
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        poison = torch.full((10, 10), float("nan"), dtype=torch.float64)
        del poison
        sims = torch.randn(10, 10, generator=gen, dtype=torch.float64).requires_grad_()
        SmoothAP(temperature=0.1, backend="torch").forward_similarities(sims, labels).backward()
        assert torch.isfinite(sims.grad).all()
        assert torch.equal(sims.grad[[2, 6, 9]], torch.zeros(3, 10, dtype=torch.float64))
        assert sims.grad[[0, 1, 3, 4, 5, 7, 8]].abs().sum() > 0
