"""Each row's k largest values in two Triton passes: group maxima, then a selection among k groups.

XMem reads memory by each query pixel's top 30 of ~26k similarities (480p,
full working memory). `torch.topk` selects them by radix: four passes over
the whole 1,620 x 26k matrix, about 0.3 ms of the fp32 step on an H200. The
k largest values of a row lie in the k groups of columns with the largest
maxima (`memory_util.top_k_last` says why), so one pass takes each group's
maximum and a second, one program per row, selects the k best groups and
then the k largest of their k x GROUP values, each time by a bitwise search
for the k-th largest in registers (a sort of the same keys took twice as
long).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .memory_util import TOP_K_GROUP as GROUP

GROUPS_PER_PROGRAM = 64
# Rows are padded to at least this many groups (32,768 columns): each padded size is a compilation, which
# a fresh machine's first video waits for, so they compile once as memory grows, not at each power of two.
MIN_PADDED_GROUPS = 1024
# One program holds a row's group maxima in registers: beyond this many groups the torch path runs.
MAX_GROUPS = 4096


@triton.jit
def _group_max_kernel(x_ptr, out_ptr, columns, row_stride, padded_groups,
                      GROUP: tl.constexpr, GROUPS_PER_PROGRAM: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    groups = tl.program_id(1) * GROUPS_PER_PROGRAM + tl.arange(0, GROUPS_PER_PROGRAM)
    cols = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    x = tl.load(x_ptr + row * row_stride + cols, mask=cols < columns, other=float("-inf"))
    tl.store(out_ptr + row * padded_groups + groups, tl.max(x, axis=1))


@triton.jit
def _order(x):
    """int64 in [0, 2**32) in the order of the float32 x (NaN above +inf, as torch.topk orders it)."""
    bits = x.to(tl.int32, bitcast=True)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64) + 2147483648


@triton.jit
def _select(order, valid, K: tl.constexpr):
    """Slots 0..K-1 for the K largest valid entries (ties by position), K or more for the rest.

    The K-th largest order is found bit by bit, from the highest: a bit stays
    set while at least K entries reach the prefix. Entries above it take the
    first slots, entries equal to it the next ones.
    """
    kth = tl.zeros((), tl.int64)
    for bit in tl.static_range(31, -1, -1):
        candidate = kth + (1 << bit)
        reaching = tl.sum((valid & (order >= candidate)).to(tl.int32))
        kth = tl.where(reaching >= K, candidate, kth)
    above = valid & (order > kth)
    tied = valid & (order == kth)
    slot = tl.where(above, tl.cumsum(above.to(tl.int32), 0) - 1,
                    tl.sum(above.to(tl.int32)) + tl.cumsum(tied.to(tl.int32), 0) - 1)
    return tl.where(above | tied, slot, K)


@triton.jit
def _top_k_kernel(x_ptr, maxima_ptr, chosen_ptr, values_ptr, indices_ptr, columns, row_stride, groups,
                  K: tl.constexpr, K_PADDED: tl.constexpr, GROUP: tl.constexpr, PADDED_GROUPS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    group = tl.arange(0, PADDED_GROUPS)
    maxima = tl.load(maxima_ptr + row * PADDED_GROUPS + group)
    slot = _select(_order(maxima), group < groups, K)
    # The best groups pass through memory: registers cannot be gathered by slot.
    tl.store(chosen_ptr + row * K_PADDED + slot, group, mask=slot < K)
    tl.debug_barrier()
    best = tl.load(chosen_ptr + row * K_PADDED + tl.arange(0, K_PADDED), mask=tl.arange(0, K_PADDED) < K, other=0)
    cols = tl.reshape(best[:, None] * GROUP + tl.arange(0, GROUP)[None, :], [K_PADDED * GROUP])
    inside = (tl.arange(0, K_PADDED * GROUP) < K * GROUP) & (cols < columns)
    x = tl.load(x_ptr + row * row_stride + cols, mask=inside)
    slot = _select(_order(x), inside, K)
    kept = slot < K
    tl.store(indices_ptr + row * K + slot, cols.to(tl.int64), mask=kept)
    tl.store(values_ptr + row * K + slot, x, mask=kept)


def smoke_test(device: torch.device) -> None:
    """One selection, compiled as XMem's reads use it (k 30; sizes Triton sees as multiples of 16).

    Triton compiles a kernel again for other constants, or for sizes that
    are not multiples of 16: a smoke test with tiny sizes cost a fresh
    machine's first video a compilation of its own.
    """
    k = 30
    top_k(torch.zeros(1, triton.cdiv(4 * k, 16) * 16 * GROUP, device=device), k)


def handles(similarity: torch.Tensor, k: int) -> bool:
    """Whether `top_k` takes these rows: float32 ones with at least 4k groups and at most MAX_GROUPS."""
    groups = triton.cdiv(similarity.shape[-1], GROUP)
    return similarity.dtype == torch.float32 and 4 * k <= groups <= MAX_GROUPS


def top_k(similarity: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest entries along the last dimension, in no particular order."""
    columns = similarity.shape[-1]
    rows = similarity.reshape(-1, columns)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    groups = triton.cdiv(columns, GROUP)
    padded_groups = max(triton.next_power_of_2(groups), MIN_PADDED_GROUPS)
    k_padded = triton.next_power_of_2(k)
    maxima = rows.new_empty((rows.shape[0], padded_groups))
    _group_max_kernel[(rows.shape[0], padded_groups // GROUPS_PER_PROGRAM)](
        rows, maxima, columns, rows.stride(0), padded_groups, GROUP=GROUP, GROUPS_PER_PROGRAM=GROUPS_PER_PROGRAM)
    chosen = torch.empty((rows.shape[0], k_padded), dtype=torch.int32, device=rows.device)
    values = rows.new_empty((rows.shape[0], k))
    indices = torch.empty((rows.shape[0], k), dtype=torch.int64, device=rows.device)
    _top_k_kernel[(rows.shape[0],)](rows, maxima, chosen, values, indices, columns, rows.stride(0), groups,
                                    K=k, K_PADDED=k_padded, GROUP=GROUP, PADDED_GROUPS=padded_groups)
    shape = (*similarity.shape[:-1], k)
    return values.view(shape), indices.view(shape)
