"""Bilinear upsampling as two small matrix products, in whatever memory layout the features have.

`F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)`
mixes at most two source pixels per output pixel along each axis, with fixed
weights. Written as interpolation matrices, out = A_h @ x @ A_w^T is the same
sum (the other entries are exact zeros), but runs as GEMMs at full memory
speed, and in channels-last layout without a transpose: PyTorch's own CUDA
kernels take 0.1 ms (NCHW) to 0.3 ms (NHWC) for one of XMem's decoder
upsamplings, the products a few microseconds.
"""
from __future__ import annotations

import functools
import math

import torch


@functools.lru_cache(maxsize=64)
def _matrix(size_in: int, scale: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(out, in) weights of 1-D linear interpolation, with PyTorch's half-pixel source positions."""
    size_out = math.floor(size_in * scale)
    out = torch.arange(size_out, dtype=torch.float64)
    source = ((out + 0.5) / scale - 0.5).clamp(min=0)
    low = source.floor().long().clamp(max=size_in - 1)
    high = (low + 1).clamp(max=size_in - 1)
    frac = source - low
    weights = torch.zeros(size_out, size_in, dtype=torch.float64)
    weights.index_put_((out.long(), low), 1 - frac, accumulate=True)
    weights.index_put_((out.long(), high), frac, accumulate=True)
    return weights.to(dtype=dtype, device=device)


def upsample_bilinear(x: torch.Tensor, scale: float) -> torch.Tensor:
    """`F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)` for (N, C, H, W) x.

    The result keeps x's layout (channels-last stays channels-last).
    """
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    rows = _matrix(x.shape[-2], float(scale), dtype, x.device)
    cols = _matrix(x.shape[-1], float(scale), dtype, x.device)
    if x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        nhwc = x.permute(0, 2, 3, 1)  # contiguous (N, H, W, C)
        batch, height, _, channels = nhwc.shape
        wide = torch.matmul(cols, nhwc.reshape(batch * height, -1, channels))  # (N*H, W', C)
        tall = torch.matmul(rows, wide.reshape(batch, height, -1))  # (N, H', W'*C)
        return tall.view(batch, rows.shape[0], cols.shape[0], channels).permute(0, 3, 1, 2)
    wide = torch.matmul(x, cols.T)  # (N, C, H, W')
    return torch.matmul(rows, wide)  # (N, C, H', W')
