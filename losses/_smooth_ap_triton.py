"""Smooth-AP's ranking part as Triton kernels: one program per query streams its row of S once, for all of
the query's positives together.

Every term of the loss and of its gradient for query q depends only on row q of the similarity matrix, so a
program holds the query's P positive similarities s_qi in registers and walks the row in tiles of columns j,
evaluating the P x tile sigmoids sig((s_qj - s_qi) / T) where they are needed and never storing them:

- forward: D_qi = 1 + sum_{j in O_q, j != i} sig(.) over the tiles; N_qi = 1 + sum_{k in P_q, k != i} sig(.)
  from the P x P positive similarities. Only N and D (B x P numbers) are written.
- backward: with a_qi = dL/dsig for j in O_q and b_qi for j in P_q (computed from N and D in torch), each
  tile's column sums of g = a sig (1 - sig) are the gradient of s_qj, and their row sums, kept in registers,
  are subtracted from the positives' own columns at the end, with the P x P terms of b.

Memory beyond S and its gradient: N, D, a and b, B x P each. The work is B x P x M exponentials forward and
as many backward, for B queries, P positives each and M columns. `smooth_ap_ranking` is the autograd
entry point; `losses.smooth_ap` chooses it (backend `triton`, or `auto` on CUDA). Under Triton's CPU
interpreter (TRITON_INTERPRET=1) the same kernels run on CPU tensors, which is how the tests check them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_POSITIVES = 512  # a query's positives are held in registers; larger classes take the torch path
TILE_ELEMENTS = 4096  # sigmoids per tile (positives x columns)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _query_positives(
    sims_ptr, queries_ptr, positives_ptr, pair, row_stride, num_positives, BLOCK_P: tl.constexpr
):
    """Program `pair`'s query, its row of S, the positives' slots and mask, where its (query, positive) arrays
    start, the positives' columns and their similarities s_qi."""
    query = tl.load(queries_ptr + pair).to(tl.int64)
    row = sims_ptr + query * row_stride
    slots = tl.arange(0, BLOCK_P)
    p_mask = slots < num_positives
    pair_base = pair.to(tl.int64) * num_positives
    positives = tl.load(positives_ptr + pair_base + slots, mask=p_mask, other=-1)
    anchor = tl.load(row + positives, mask=p_mask, other=0.0)
    return query, row, slots, p_mask, pair_base, positives, anchor


@triton.jit
def _tile(
    row, start, columns, anchor, p_mask, positives, own, inv_temperature,
    INCLUDE_SELF: tl.constexpr, BLOCK_J: tl.constexpr,
):  # fmt: skip
    """Columns j of the tile at `start`, their mask, the P x tile sigmoids sig((s_qj - s_qi) / T), and which
    pairs count: j in range, j != i, and j != q's own column unless `INCLUDE_SELF`."""
    j = start + tl.arange(0, BLOCK_J)
    j_mask = j < columns
    s_j = tl.load(row + j, mask=j_mask, other=0.0)
    sig = _sigmoid((s_j[None, :] - anchor[:, None]) * inv_temperature)
    keep = p_mask[:, None] & j_mask[None, :] & (j[None, :] != positives[:, None])
    if not INCLUDE_SELF:
        keep = keep & (j[None, :] != own)
    return j, j_mask, sig, keep


@triton.jit
def _positive_pairs(anchor, slots, p_mask, inv_temperature):
    """The P x P sigmoids sig((s_qk - s_qi) / T) [i, k] among the positives, and which count (k != i)."""
    sig = _sigmoid((anchor[None, :] - anchor[:, None]) * inv_temperature)
    keep = p_mask[:, None] & p_mask[None, :] & (slots[None, :] != slots[:, None])
    return sig, keep


@triton.jit
def _forward_kernel(
    sims_ptr,
    queries_ptr,
    positives_ptr,
    numer_ptr,
    denom_ptr,
    row_stride,
    columns,
    num_positives,
    query_offset,
    inv_temperature,
    INCLUDE_SELF: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    query, row, slots, p_mask, pair_base, positives, anchor = _query_positives(
        sims_ptr, queries_ptr, positives_ptr, tl.program_id(0), row_stride, num_positives, BLOCK_P
    )
    denom = tl.zeros([BLOCK_P], dtype=anchor.dtype)
    for start in range(0, columns, BLOCK_J):
        j, j_mask, sig, keep = _tile(
            row, start, columns, anchor, p_mask, positives, query + query_offset, inv_temperature,
            INCLUDE_SELF, BLOCK_J,
        )  # fmt: skip
        denom += tl.sum(tl.where(keep, sig, 0.0), axis=1)
    sig_pp, keep_pp = _positive_pairs(anchor, slots, p_mask, inv_temperature)
    numer = tl.sum(tl.where(keep_pp, sig_pp, 0.0), axis=1)
    tl.store(numer_ptr + pair_base + slots, numer + 1.0, mask=p_mask)
    tl.store(denom_ptr + pair_base + slots, denom + 1.0, mask=p_mask)


@triton.jit
def _backward_kernel(
    sims_ptr,
    grad_ptr,
    queries_ptr,
    positives_ptr,
    item_coef_ptr,
    positive_coef_ptr,
    row_stride,
    columns,
    num_positives,
    query_offset,
    inv_temperature,
    INCLUDE_SELF: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    query, row, slots, p_mask, pair_base, positives, anchor = _query_positives(
        sims_ptr, queries_ptr, positives_ptr, tl.program_id(0), row_stride, num_positives, BLOCK_P
    )
    grad_row = grad_ptr + query * row_stride
    item_coef = tl.load(item_coef_ptr + pair_base + slots, mask=p_mask, other=0.0)
    positive_coef = tl.load(positive_coef_ptr + pair_base + slots, mask=p_mask, other=0.0)
    row_sums = tl.zeros([BLOCK_P], dtype=anchor.dtype)
    for start in range(0, columns, BLOCK_J):
        j, j_mask, sig, keep = _tile(
            row, start, columns, anchor, p_mask, positives, query + query_offset, inv_temperature,
            INCLUDE_SELF, BLOCK_J,
        )  # fmt: skip
        g = tl.where(keep, item_coef[:, None] * (sig - sig * sig), 0.0)
        tl.store(grad_row + j, tl.sum(g, axis=0), mask=j_mask)  # dL/ds_qj, as item j
        row_sums += tl.sum(g, axis=1)
    sig_pp, keep_pp = _positive_pairs(anchor, slots, p_mask, inv_temperature)
    g_pp = tl.where(keep_pp, positive_coef[:, None] * (sig_pp - sig_pp * sig_pp), 0.0)
    # positive k as an item of the numerators, minus positive i as the anchor of every sigmoid of its pair
    correction = tl.sum(g_pp, axis=0) - tl.sum(g_pp, axis=1) - row_sums
    tl.debug_barrier()  # the tiles' stores of the positives' columns are visible to every thread
    current = tl.load(grad_row + positives, mask=p_mask, other=0.0)
    tl.store(grad_row + positives, current + correction, mask=p_mask)


def _blocks(num_positives: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_J): positives padded to a power of two, and a tile of about TILE_ELEMENTS sigmoids."""
    block_p = max(2, triton.next_power_of_2(num_positives))
    return block_p, max(16, TILE_ELEMENTS // block_p)


def _launch_forward(
    sims: Tensor,
    queries: Tensor,
    positives: Tensor,
    query_offset: int,
    temperature: float,
    include_self: bool,
) -> tuple[Tensor, Tensor]:
    numer = sims.new_empty(positives.shape)
    denom = sims.new_empty(positives.shape)
    block_p, block_j = _blocks(positives.shape[1])
    _forward_kernel[(queries.numel(),)](
        sims, queries, positives, numer, denom,
        sims.stride(0), sims.shape[1], positives.shape[1], query_offset, 1.0 / temperature,
        INCLUDE_SELF=include_self, BLOCK_P=block_p, BLOCK_J=block_j,
    )  # fmt: skip
    return numer, denom


class _TritonRanking(torch.autograd.Function):
    """1 - mean AP from the similarity matrix, by the kernels above; groups as `losses.smooth_ap` makes
    them (queries with the same number of positives)."""

    @staticmethod
    def forward(ctx, sims, groups, temperature, include_self, query_offset):
        sums = [_launch_forward(sims, q, p, query_offset, temperature, include_self) for q, p in groups]
        num_queries = sum(queries.numel() for queries, _ in groups)
        mean_ap = sims.new_zeros(())
        for (_, positives), (numer, denom) in zip(groups, sums, strict=True):
            mean_ap += (numer / denom).sum() / (positives.shape[1] * num_queries)
        ctx.save_for_backward(sims)
        ctx.settings = (groups, sums, num_queries, temperature, include_self, query_offset)
        return 1.0 - mean_ap

    @staticmethod
    def backward(ctx, grad_output):
        (sims,) = ctx.saved_tensors
        groups, sums, num_queries, temperature, include_self, query_offset = ctx.settings
        grad = torch.zeros_like(sims)  # rows of queries without a positive stay zero
        for (queries, positives), (numer, denom) in zip(groups, sums, strict=True):
            # L = 1 - sum w N/D, w = 1/(#queries * m); the 1/T of d(sig)/ds is folded into the coefficients
            coef = grad_output / (num_queries * positives.shape[1] * temperature)
            item_coef = coef * numer / (denom * denom)
            positive_coef = -coef / denom
            block_p, block_j = _blocks(positives.shape[1])
            _backward_kernel[(queries.numel(),)](
                sims, grad, queries, positives, item_coef.contiguous(), positive_coef.contiguous(),
                sims.stride(0), sims.shape[1], positives.shape[1], query_offset, 1.0 / temperature,
                INCLUDE_SELF=include_self, BLOCK_P=block_p, BLOCK_J=block_j,
            )  # fmt: skip
        return grad, None, None, None, None


def smooth_ap_ranking(
    sims: Tensor,
    groups: list[tuple[Tensor, Tensor]],
    temperature: float,
    include_self: bool,
    query_offset: int = 0,
) -> Tensor:
    """1 - mean Smooth-AP of the (B x M) similarities, the queries grouped as `losses.smooth_ap.query_groups`
    makes them; every group must have at most MAX_POSITIVES positives per query."""
    largest = max(positives.shape[1] for _, positives in groups)
    if largest > MAX_POSITIVES:
        raise ValueError(
            f"smooth_ap: the triton backend holds at most {MAX_POSITIVES} positives per query, this batch "
            f"has {largest}; use backend='torch' or 'auto'"
        )
    sims = sims.contiguous()
    groups = [(queries.contiguous(), positives.contiguous()) for queries, positives in groups]
    return _TritonRanking.apply(sims, groups, float(temperature), bool(include_self), int(query_offset))
