"""Memory reading maths: anisotropic L2 similarity, top-k softmax, value readout.

Shapes: keys are (B, C_k, N) for N memory elements and (B, C_k, P) for P query
pixels (spatial dimensions may still be unflattened, they are flattened here).
Similarities and affinities are (B, N, P).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F

from .triton_support import triton_kernels


def get_similarity(memory_key: torch.Tensor, memory_shrinkage: torch.Tensor | None,
                   query_key: torch.Tensor, query_selection: torch.Tensor | None,
                   query_major: bool = False) -> torch.Tensor:
    """Negative squared distance between memory and query keys: (B, N, P), or (B, P, N) if query_major.

    The query selection weights each key channel (XMem's anisotropic L2); the
    memory shrinkage sharpens or flattens each memory element's affinity. The
    squared distance is expanded so that the whole similarity, shrinkage and
    scale included, is one matrix product of a memory operand and a query
    operand: nothing of size N x P x C_k is built, and the N x P result is
    written once.
    """
    memory_side = memory_operand(memory_key, memory_shrinkage, with_selection=query_selection is not None)
    return operand_similarity(memory_side, query_key, query_selection, query_major)


def operand_similarity(memory_side: torch.Tensor, query_key: torch.Tensor, query_selection: torch.Tensor | None,
                       query_major: bool = False, biased: bool = False,
                       out: torch.Tensor | None = None, split: bool = False) -> torch.Tensor:
    """`get_similarity` from a ready memory operand, which stays the same until memory changes.

    With `biased` the operand has one more column: a bias per memory element
    that the product adds to every query pixel's similarity (-inf leaves the
    element out of the top-k at no extra pass). `out`: where to write the
    (contiguous) result. Under mixed precision it still runs in fp32: the
    expansion subtracts large, nearly equal terms, which half precision cannot.
    With `split` the memory operand is `split_memory_operand`'s, and the
    product runs on TF32 tensor cores at close to fp32 accuracy.
    """
    with torch.autocast(query_key.device.type, enabled=False):
        query_side = query_operand(_at_least_fp32(query_key),
                                   None if query_selection is None else _at_least_fp32(query_selection))
        if split:
            high, low = tf32_parts(query_side)
            query_side = torch.cat([high, high, low], dim=1)
        if biased:
            query_side = torch.cat([query_side, torch.ones_like(query_side[:, :1])], dim=1)
        with _tf32_products(split):
            if query_major:
                return torch.matmul(query_side.transpose(1, 2), memory_side.transpose(1, 2), out=out)
            return torch.matmul(memory_side, query_side, out=out)


# The fp32 bits below TF32's 10-bit mantissa (13 of fp32's 23).
_BELOW_TF32 = (1 << 13) - 1


def tf32_parts(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 `tensor` as high + low: high keeps the bits TF32 holds (so a tensor core takes it exactly), low
    is the exact rest (0 where `tensor` is infinite), whose own TF32 rounding costs about 2^-21 of `tensor`."""
    high = (tensor.view(torch.int32) & ~_BELOW_TF32).view(torch.float32)
    return high, torch.where(torch.isfinite(tensor), tensor - high, 0.0)


def split_memory_operand(memory_side: torch.Tensor) -> torch.Tensor:
    """A memory operand (B, N, D) as (B, N, 3D) = [high, low, high], to meet the split query side [high, high,
    low]: the product adds high x high + low x high + high x low in TF32 and leaves out only low x low (about
    2^-22 relative), three times the work of fp32 at several times its speed on tensor cores."""
    high, low = tf32_parts(memory_side)
    return torch.cat([high, low, high], dim=-1)


@contextlib.contextmanager
def _tf32_products(enabled: bool) -> Iterator[None]:
    """Let cuBLAS run fp32 products on TF32 tensor cores. The switch is global: a split read sets it while
    a CUDA graph captures it (its replays keep the kernels), not on every read."""
    if not enabled:
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def memory_operand(memory_key: torch.Tensor, memory_shrinkage: torch.Tensor | None,
                   with_selection: bool) -> torch.Tensor:
    """The memory side (B, N, D) of the similarity product, in at least fp32.

    With selection e, per channel c: -(m_c - q_c)^2 e_c = -m_c^2 e_c + 2 m_c q_c e_c - q_c^2 e_c,
    so memory rows [m^2, m, 1] meet query columns [-e, 2 q e, -sum(q^2 e)] (`query_operand`).
    Without selection the query's own norm is dropped (as in XMem): it is
    constant over memory elements, so rows [m, sum(m^2)] meet [2 q, -1].
    Each memory row is then scaled by its shrinkage / sqrt(C_k).
    """
    with torch.autocast(memory_key.device.type, enabled=False):
        key_dim = memory_key.shape[1]
        mk = _at_least_fp32(memory_key).flatten(start_dim=2)
        if with_selection:
            memory_side = torch.cat([mk.pow(2), mk, torch.ones_like(mk[:, :1])], dim=1)
        else:
            memory_side = torch.cat([mk, mk.pow(2).sum(1, keepdim=True)], dim=1)
        scale = 1 / math.sqrt(key_dim)
        if memory_shrinkage is not None:
            scale = _at_least_fp32(memory_shrinkage).flatten(start_dim=2) * scale
        return (memory_side * scale).transpose(1, 2)


def query_operand(query_key: torch.Tensor, query_selection: torch.Tensor | None) -> torch.Tensor:
    """The query side (B, D, P) of the similarity product (see `memory_operand`)."""
    qk = query_key.flatten(start_dim=2)
    if query_selection is None:
        return torch.cat([2 * qk, -torch.ones_like(qk[:, :1])], dim=1)
    qe = query_selection.flatten(start_dim=2)
    return torch.cat([-qe, 2 * qk * qe, -(qe * qk.pow(2)).sum(1, keepdim=True)], dim=1)


def topk_softmax(similarity: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
    """Softmax over memory elements (dim 1), keeping only each pixel's top_k matches.

    Entries outside the top k get exactly zero affinity. With top_k None this
    is a plain softmax. top_k is capped at the number of memory elements.
    """
    if top_k is None:
        return torch.softmax(similarity, dim=1)
    values, indices = torch.topk(similarity, k=min(top_k, similarity.shape[1]), dim=1)
    return torch.zeros_like(similarity).scatter_(1, indices, torch.softmax(values, dim=1))


def sparse_topk_softmax(similarity: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query pixel's top_k memory matches and their softmax weights, from (B, P, N) similarities.

    Returns (weights, indices), both (B, P, k): the nonzero entries of
    `topk_softmax` in query-major layout, without building the mostly-zero
    N x P affinity. k is capped at N.
    """
    values, indices = top_k_last(similarity, top_k)
    return torch.softmax(values, dim=-1), indices


# Columns per group when `top_k_last` looks for candidates by group maxima.
TOP_K_GROUP = 32
# The Triton kernels of that search on CUDA.
TOP_K_KERNELS = f"{__package__}.top_k_kernel"


def top_k_last(similarity: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest values along the last dimension and their indices (unsorted), k capped at its size.

    A long row is cut into groups of TOP_K_GROUP columns: if an element is
    among the row's k largest, fewer than k groups can have a larger maximum
    than its own group's, so the k groups with the largest maxima hold all of
    them (an element tied with the k-th may be swapped for an equal one, as
    `torch.topk` may). So one reduction over the row and two top-ks over
    short rows replace `torch.topk`'s radix passes over the whole row (four
    at XMem's memory sizes; 1.5 times faster on a 2-core CPU). On CUDA the
    same search runs as two Triton kernels (`top_k_kernel`): 0.32 -> 0.08 ms
    of a 480p fp32 step on an H200.
    """
    kernels = triton_kernels(TOP_K_KERNELS, similarity.device)
    if kernels is not None and kernels.handles(similarity, k):
        return kernels.top_k(similarity, k)
    size = similarity.shape[-1]
    groups = size // TOP_K_GROUP
    if groups < 4 * k:
        return torch.topk(similarity, k=min(k, size), dim=-1, sorted=False)
    body = groups * TOP_K_GROUP
    grouped = similarity[..., :body].unflatten(-1, (groups, TOP_K_GROUP))
    best = grouped.amax(-1).topk(k, dim=-1, sorted=False).indices
    candidates = grouped.gather(-2, best.unsqueeze(-1).expand(*best.shape, TOP_K_GROUP)).flatten(-2)
    grouped_candidates = candidates.shape[-1]
    if body < size:  # the last columns, fewer than a group, are candidates too
        candidates = torch.cat([candidates, similarity[..., body:]], -1)
    values, at = candidates.topk(k, dim=-1, sorted=False)
    group = best.gather(-1, (at // TOP_K_GROUP).clamp(max=k - 1))
    columns = torch.where(at < grouped_candidates, group * TOP_K_GROUP + at % TOP_K_GROUP,
                          at - grouped_candidates + body)
    return values, columns


def element_major(memory_value: torch.Tensor) -> torch.Tensor:
    """Values (O, C_v, N) as one row per memory element, (N, O * C_v): the layout `sparse_readout` gathers from."""
    return memory_value.flatten(0, 1).T.contiguous()


def sparse_readout(weights: torch.Tensor, indices: torch.Tensor, per_element: torch.Tensor,
                   objects: int) -> torch.Tensor:
    """Weighted sum of each pixel's chosen memory values: (1, P, k) matches -> (O, C_v, P).

    `per_element` is `element_major(values)` for values (O, C_v, N). Equals
    `values @ affinity` for the dense affinity the matches describe, with k
    rather than N terms per output, as one fused gather-sum (`embedding_bag`).
    The result is a channels-last view (C_v has stride 1).
    """
    pixels, k = indices.shape[-2:]
    summed = F.embedding_bag(indices.reshape(pixels, k), per_element, mode="sum",
                             per_sample_weights=weights.reshape(pixels, k).to(per_element.dtype))
    return summed.view(pixels, objects, -1).permute(1, 2, 0)


def sparse_usage(weights: torch.Tensor, indices: torch.Tensor, num_elements: int) -> torch.Tensor:
    """How much affinity each memory element received over all query pixels, (B, N) (dense affinity's row sums)."""
    batch = weights.shape[0]
    usage = weights.new_zeros((batch, num_elements))
    return usage.scatter_add_(1, indices.reshape(batch, -1), weights.reshape(batch, -1))


def readout(affinity: torch.Tensor, memory_value: torch.Tensor) -> torch.Tensor:
    """Affinity-weighted sum of memory values (B, C_v, T, H, W) -> (B, C_v, H, W)."""
    batch, value_dim = memory_value.shape[:2]
    height, width = memory_value.shape[-2:]
    mem = torch.bmm(memory_value.reshape(batch, value_dim, -1), affinity)
    return mem.view(batch, value_dim, height, width)
