"""Memory reading maths: anisotropic L2 similarity, top-k softmax, value readout.

Shapes: keys are (B, C_k, N) for N memory elements and (B, C_k, P) for P query
pixels (spatial dimensions may still be unflattened, they are flattened here).
Similarities and affinities are (B, N, P).
"""
from __future__ import annotations

import math

import torch


def get_similarity(memory_key: torch.Tensor, memory_shrinkage: torch.Tensor | None,
                   query_key: torch.Tensor, query_selection: torch.Tensor | None) -> torch.Tensor:
    """Negative squared distance between memory and query keys, (B, N, P).

    The query selection weights each key channel (XMem's anisotropic L2); the
    memory shrinkage sharpens or flattens each memory element's affinity. The
    squared distance is expanded into three matrix products so nothing of size
    N x P x C_k is ever built. Under mixed precision it still runs in fp32: the
    expansion subtracts large, nearly equal terms, which half precision cannot.
    """
    with torch.autocast(memory_key.device.type, enabled=False):
        return _similarity(*(None if t is None else _at_least_fp32(t)
                             for t in (memory_key, memory_shrinkage, query_key, query_selection)))


def _at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _similarity(memory_key: torch.Tensor, memory_shrinkage: torch.Tensor | None,
                query_key: torch.Tensor, query_selection: torch.Tensor | None) -> torch.Tensor:
    key_dim = memory_key.shape[1]
    mk = memory_key.flatten(start_dim=2)
    qk = query_key.flatten(start_dim=2)

    if query_selection is not None:
        qe = query_selection.flatten(start_dim=2)
        mk_t = mk.transpose(1, 2)
        memory_sq = mk_t.pow(2) @ qe
        cross = 2 * (mk_t @ (qk * qe))
        query_sq = (qe * qk.pow(2)).sum(1, keepdim=True)
        similarity = -memory_sq + cross - query_sq
    else:
        # The query's own norm is constant over memory elements and cancels in the softmax.
        memory_sq = mk.pow(2).sum(1).unsqueeze(2)
        cross = 2 * (mk.transpose(1, 2) @ qk)
        similarity = -memory_sq + cross

    if memory_shrinkage is not None:
        similarity = similarity * memory_shrinkage.flatten(start_dim=1).unsqueeze(2)
    return similarity / math.sqrt(key_dim)


def topk_softmax(similarity: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
    """Softmax over memory elements (dim 1), keeping only each pixel's top_k matches.

    Entries outside the top k get exactly zero affinity. With top_k None this
    is a plain softmax. top_k is capped at the number of memory elements.
    """
    if top_k is None:
        return torch.softmax(similarity, dim=1)
    values, indices = torch.topk(similarity, k=min(top_k, similarity.shape[1]), dim=1)
    return torch.zeros_like(similarity).scatter_(1, indices, torch.softmax(values, dim=1))


def readout(affinity: torch.Tensor, memory_value: torch.Tensor) -> torch.Tensor:
    """Affinity-weighted sum of memory values (B, C_v, T, H, W) -> (B, C_v, H, W)."""
    batch, value_dim = memory_value.shape[:2]
    height, width = memory_value.shape[-2:]
    mem = torch.bmm(memory_value.reshape(batch, value_dim, -1), affinity)
    return mem.view(batch, value_dim, height, width)
