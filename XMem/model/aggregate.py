"""Soft aggregation (from STM): merge independent per-object probabilities into one softmax."""
from __future__ import annotations

import torch

_EPS = 1e-7


def aggregate(prob: torch.Tensor, dim: int, return_logits: bool = False):
    """Add a background channel in front along `dim` and renormalise all channels.

    Each object's probability is treated as an independent sigmoid output; the
    background is the chance that no object is present. The odds are clamped
    away from 0 and 1 so the logits stay finite, then a softmax makes the
    channels sum to one. Returns the probabilities, or (logits, probabilities).
    """
    background = torch.prod(1 - prob, dim=dim, keepdim=True)
    with_bg = torch.cat([background, prob], dim=dim).clamp(_EPS, 1 - _EPS)
    logits = torch.log(with_bg / (1 - with_bg))
    # softmax written out: over a leading dimension of a frame, torch.softmax's
    # CUDA kernel is several times slower than these four passes.
    exp = torch.exp(logits - logits.amax(dim=dim, keepdim=True))
    prob = exp / exp.sum(dim=dim, keepdim=True)
    return (logits, prob) if return_logits else prob
