"""Smooth-AP's ranking part as Triton kernels: one program per query streams its row of S, for a chunk of the
query's positives at a time.

Every term of the loss and of its gradient for query q depends only on row q of the similarity matrix, so a
program holds up to CHUNK_POSITIVES positive similarities s_qi in registers and walks the row in tiles of
columns j, evaluating the chunk x tile sigmoids sig((s_qj - s_qi) / T) where they are needed and never storing
them. A query with more positives takes its chunks one after another: the work is the same, the row is read
once per chunk (from L2 mostly), and the registers hold a chunk x tile block whatever the class size. Holding
all positives at once spilled on sm_90 from 128 positives on (60 KB of spills at 512); the tests compile the
kernels for sm_90 at every chunk size and assert that none spills.

- forward, per chunk of positives i: D_qi = 1 + sum_{j in O_q, j != i} sig(.) over the tiles, and
  N_qi = 1 + sum_{k in P_q, k != i} sig(.) over the chunks of positives k. Only N and D (B x P) are written.
- backward: with a_qi = dL/dsig for j in O_q and b_qi for j in P_q (computed from N and D in torch), each
  tile's column sums of g = a sig (1 - sig) are added to the gradient of s_qj, their row sums are kept for
  the chunk, and the positives' own columns get the P x P terms of b and minus the row sums. The program
  adds into its own row only, one step after another (a barrier between them).

The temperature arrives as a one-element tensor of S's dtype: a compiled kernel receives a Python float as
fp32, which moved the float64 loss by about 1e-9 at T = 0.3 (the interpreter keeps fp64); loaded from memory,
1/T has S's precision under both, as the torch path's has.

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

CHUNK_POSITIVES = 64  # positives held in registers at a time; no spills on sm_90 (the tests compile it)
TILE_ELEMENTS = 1024  # sigmoids per tile (positives x columns): 2048 spilled 8 B at BLOCK_P = 8 on sm_90


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _chunk(row, positives_ptr, pair_base, first, num_positives, BLOCK_P: tl.constexpr):
    """Slots first.. of the query's positives: their indices, mask, columns and similarities s_qi."""
    slots = first + tl.arange(0, BLOCK_P)
    mask = slots < num_positives
    positives = tl.load(positives_ptr + pair_base + slots, mask=mask, other=-1)
    anchor = tl.load(row + positives, mask=mask, other=0.0)
    return slots, mask, positives, anchor


@triton.jit
def _tile(
    row, start, columns, anchor, p_mask, positives, own, inv_temperature,
    INCLUDE_SELF: tl.constexpr, BLOCK_J: tl.constexpr,
):  # fmt: skip
    """Columns j of the tile at `start`, their mask, the chunk x tile sigmoids sig((s_qj - s_qi) / T), and
    which pairs count: j in range, j != i, and j != q's own column unless `INCLUDE_SELF`."""
    j = start + tl.arange(0, BLOCK_J)
    j_mask = j < columns
    s_j = tl.load(row + j, mask=j_mask, other=0.0)
    sig = _sigmoid((s_j[None, :] - anchor[:, None]) * inv_temperature)
    keep = p_mask[:, None] & j_mask[None, :] & (j[None, :] != positives[:, None])
    if not INCLUDE_SELF:
        keep = keep & (j[None, :] != own)
    return j, j_mask, sig, keep


@triton.jit
def _positive_pairs(anchor_i, slots_i, mask_i, anchor_k, slots_k, mask_k, inv_temperature):
    """The sigmoids sig((s_qk - s_qi) / T) [i, k] between two chunks of positives; which count (k != i)."""
    sig = _sigmoid((anchor_k[None, :] - anchor_i[:, None]) * inv_temperature)
    keep = mask_i[:, None] & mask_k[None, :] & (slots_k[None, :] != slots_i[:, None])
    return sig, keep


@triton.jit
def _forward_kernel(
    sims_ptr,
    queries_ptr,
    positives_ptr,
    numer_ptr,
    denom_ptr,
    inv_temperature_ptr,
    row_stride,
    columns,
    num_positives,
    query_offset,
    INCLUDE_SELF: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    pair = tl.program_id(0)
    query = tl.load(queries_ptr + pair).to(tl.int64)
    row = sims_ptr + query * row_stride
    pair_base = pair.to(tl.int64) * num_positives
    inv_temperature = tl.load(inv_temperature_ptr)
    for first in range(0, num_positives, BLOCK_P):
        slots, p_mask, positives, anchor = _chunk(
            row, positives_ptr, pair_base, first, num_positives, BLOCK_P
        )
        denom = tl.zeros([BLOCK_P], dtype=anchor.dtype)
        for start in range(0, columns, BLOCK_J):
            j, j_mask, sig, keep = _tile(
                row, start, columns, anchor, p_mask, positives, query + query_offset, inv_temperature,
                INCLUDE_SELF, BLOCK_J,
            )  # fmt: skip
            denom += tl.sum(tl.where(keep, sig, 0.0), axis=1)
        numer = tl.zeros([BLOCK_P], dtype=anchor.dtype)
        for other in range(0, num_positives, BLOCK_P):
            slots_k, mask_k, _, anchor_k = _chunk(
                row, positives_ptr, pair_base, other, num_positives, BLOCK_P
            )
            sig_pp, keep_pp = _positive_pairs(
                anchor, slots, p_mask, anchor_k, slots_k, mask_k, inv_temperature
            )
            numer += tl.sum(tl.where(keep_pp, sig_pp, 0.0), axis=1)
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
    inv_temperature_ptr,
    row_stride,
    columns,
    num_positives,
    query_offset,
    INCLUDE_SELF: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    pair = tl.program_id(0)
    query = tl.load(queries_ptr + pair).to(tl.int64)
    row = sims_ptr + query * row_stride
    grad_row = grad_ptr + query * row_stride
    pair_base = pair.to(tl.int64) * num_positives
    inv_temperature = tl.load(inv_temperature_ptr)
    for first in range(0, num_positives, BLOCK_P):
        slots, p_mask, positives, anchor = _chunk(
            row, positives_ptr, pair_base, first, num_positives, BLOCK_P
        )
        item_coef = tl.load(item_coef_ptr + pair_base + slots, mask=p_mask, other=0.0)
        positive_coef = tl.load(positive_coef_ptr + pair_base + slots, mask=p_mask, other=0.0)
        row_sums = tl.zeros([BLOCK_P], dtype=anchor.dtype)
        for start in range(0, columns, BLOCK_J):
            j, j_mask, sig, keep = _tile(
                row, start, columns, anchor, p_mask, positives, query + query_offset, inv_temperature,
                INCLUDE_SELF, BLOCK_J,
            )  # fmt: skip
            g = tl.where(keep, item_coef[:, None] * (sig - sig * sig), 0.0)
            # dL/ds_qj as item j: the first chunk writes the row, later ones add to it
            earlier = tl.load(grad_row + j, mask=j_mask & (first > 0), other=0.0)
            tl.store(grad_row + j, earlier + tl.sum(g, axis=0), mask=j_mask)
            row_sums += tl.sum(g, axis=1)
        tl.debug_barrier()  # every store of this chunk's tiles is visible before the positives' columns move
        anchor_sums = row_sums
        for other in range(0, num_positives, BLOCK_P):
            slots_k, mask_k, positives_k, anchor_k = _chunk(
                row, positives_ptr, pair_base, other, num_positives, BLOCK_P
            )
            sig_pp, keep_pp = _positive_pairs(
                anchor, slots, p_mask, anchor_k, slots_k, mask_k, inv_temperature
            )
            g_pp = tl.where(keep_pp, positive_coef[:, None] * (sig_pp - sig_pp * sig_pp), 0.0)
            # positive k as an item of chunk i's numerators
            current = tl.load(grad_row + positives_k, mask=mask_k, other=0.0)
            tl.store(grad_row + positives_k, current + tl.sum(g_pp, axis=0), mask=mask_k)
            tl.debug_barrier()
            anchor_sums += tl.sum(g_pp, axis=1)
        # positive i as the anchor of every sigmoid of its pair
        current = tl.load(grad_row + positives, mask=p_mask, other=0.0)
        tl.store(grad_row + positives, current - anchor_sums, mask=p_mask)
        tl.debug_barrier()


def _blocks(num_positives: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_J): a chunk of positives (a power of two up to CHUNK_POSITIVES), and a tile of about
    TILE_ELEMENTS sigmoids."""
    block_p = min(CHUNK_POSITIVES, max(2, triton.next_power_of_2(num_positives)))
    return block_p, max(16, TILE_ELEMENTS // block_p)


def _inverse_temperature(sims: Tensor, temperature: float) -> Tensor:
    """1/T as a one-element tensor of S's dtype, so compiled and interpreted kernels use the same value."""
    return torch.full((1,), 1.0 / temperature, dtype=sims.dtype, device=sims.device)


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
        sims, queries, positives, numer, denom, _inverse_temperature(sims, temperature),
        sims.stride(0), sims.shape[1], positives.shape[1], query_offset,
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
        # the kernels write every column of a query's row; only rows of queries without a positive need zeros
        grad = torch.empty_like(sims) if num_queries == sims.shape[0] else torch.zeros_like(sims)
        for (queries, positives), (numer, denom) in zip(groups, sums, strict=True):
            # L = 1 - sum w N/D, w = 1/(#queries * m); the 1/T of d(sig)/ds is folded into the coefficients
            coef = grad_output / (num_queries * positives.shape[1] * temperature)
            item_coef = coef * numer / (denom * denom)
            positive_coef = -coef / denom
            block_p, block_j = _blocks(positives.shape[1])
            _backward_kernel[(queries.numel(),)](
                sims, grad, queries, positives, item_coef.contiguous(), positive_coef.contiguous(),
                _inverse_temperature(sims, temperature),
                sims.stride(0), sims.shape[1], positives.shape[1], query_offset,
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
    makes them."""
    sims = sims.contiguous()
    groups = [(queries.contiguous(), positives.contiguous()) for queries, positives in groups]
    return _TritonRanking.apply(sims, groups, float(temperature), bool(include_self), int(query_offset))
