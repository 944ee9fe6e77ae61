"""The similarity products of the ranking losses, S = E E^T and S = Q R^T, with backwards that keep the
forward's precision (TF32 or fp32) and, for the Gram matrix, one matmul and no extra B x B buffer."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor


@contextmanager
def cuda_matmul_precision(tf32: bool) -> Iterator[None]:
    """fp32 products on CUDA in TF32 (fp32 accumulation) inside the block when `tf32`; restored after.

    Set through the legacy flag, which leaves both APIs readable inside: after the new API's
    `matmul.fp32_precision = "tf32"`, reading `matmul.allow_tf32` or `torch.get_float32_matmul_precision()`
    raises ("mix of the legacy and new APIs"). A caller already in TF32 through the new API is left alone,
    since reading its legacy flag would raise; an untouched "none" reads "ieee" afterwards, the same
    precision."""
    matmul = torch.backends.cuda.matmul
    if not tf32 or matmul.fp32_precision == "tf32":
        yield
        return
    previous, matmul.allow_tf32 = matmul.allow_tf32, True
    try:
        yield
    finally:
        matmul.allow_tf32 = previous


class Gram(torch.autograd.Function):
    """S = E E^T with a one-matmul backward, dE = (G + G^T) E (autograd's mm backward takes two).

    G + G^T is formed in G's own memory, tile pair by tile pair, rather than in a third B x B buffer (17 GB
    at B = 65,536): S never leaves `SmoothAP.forward`, so G is the ranking backward's fresh buffer. A G that
    is not a plain contiguous matrix (the zero loss's expanded gradient) takes the out-of-place sum."""

    @staticmethod
    def forward(ctx, emb, tf32):
        ctx.save_for_backward(emb)
        ctx.tf32 = tf32
        with cuda_matmul_precision(tf32):
            return emb @ emb.T

    @staticmethod
    def backward(ctx, grad):
        (emb,) = ctx.saved_tensors
        symmetric = symmetrize_(grad) if grad.is_contiguous() else grad + grad.T
        with cuda_matmul_precision(ctx.tf32):
            return symmetric @ emb, None


SYMMETRIZE_TILE = 4096  # rows and columns per tile of the in-place G + G^T: a 64 MB temporary in fp32


def symmetrize_(matrix: Tensor) -> Tensor:
    """matrix <- matrix + matrix^T in place, one pair of mirrored tiles at a time."""
    size, tile = matrix.shape[0], SYMMETRIZE_TILE
    for row in range(0, size, tile):
        for col in range(row, size, tile):
            upper = matrix[row : row + tile, col : col + tile]
            lower = matrix[col : col + tile, row : row + tile]
            total = upper + lower.T
            upper.copy_(total)
            if col != row:
                lower.copy_(total.T)
    return matrix


class Cross(torch.autograd.Function):
    """S = Q R^T for queries Q and a retrieval set R, both products of the backward in the same precision as
    the forward's (autograd's own backward would run outside the TF32 context)."""

    @staticmethod
    def forward(ctx, queries, refs, tf32):
        ctx.save_for_backward(queries, refs)
        ctx.tf32 = tf32
        with cuda_matmul_precision(tf32):
            return queries @ refs.T

    @staticmethod
    def backward(ctx, grad):
        queries, refs = ctx.saved_tensors
        with cuda_matmul_precision(ctx.tf32):
            grad_queries = grad @ refs if ctx.needs_input_grad[0] else None
            grad_refs = grad.T @ queries if ctx.needs_input_grad[1] else None
        return grad_queries, grad_refs, None
