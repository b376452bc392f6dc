"""Layers for per-object features shaped (batch, objects, channels, H, W).

Every object of a frame goes through the same weights, so these layers fold
the object axis into the batch axis, run an ordinary 2-D op, and unfold it.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .resample import upsample_bilinear


def per_object(op: Callable[[torch.Tensor], torch.Tensor], g: torch.Tensor) -> torch.Tensor:
    """Apply a (N, C, H, W) operation to (B, K, C, H, W) features."""
    batch, objects = g.shape[:2]
    out = op(fold_objects(g))
    return out.view(batch, objects, *out.shape[1:])


def fold_objects(g: torch.Tensor) -> torch.Tensor:
    """(B, K, C, H, W) -> (B * K, C, H, W), channels-last features with the strides that say so.

    Folding keeps whatever stride a view gave a batch axis of size 1, and
    PyTorch kernels that read the layout from the strides (pooling,
    interpolation) take one channels-last image with another batch stride for
    channels-first and copy it first: 48 us before the pooling at XMem's
    stride 4 on an H200, twice the pooling itself.
    """
    flat = g.flatten(0, 1)
    if flat.is_contiguous(memory_format=torch.channels_last) and not flat.is_contiguous():
        _, channels, height, width = flat.shape
        flat = flat.as_strided(flat.shape, (channels * height * width, 1, width * channels, channels))
    return flat


def upsample_objects(g: torch.Tensor, ratio: float = 2) -> torch.Tensor:
    """Bilinear upsampling of every object's features."""
    return per_object(lambda x: upsample_bilinear(x, ratio), g)


def downsample_objects(g: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """Area (average) downsampling of every object's features.

    Where 1 / ratio is a whole number that divides both sizes, area
    downsampling is average pooling over that square (the same averages):
    PyTorch's pooling kernel reads channels-last features in their layout,
    where its adaptive one, which area interpolation runs, took 26 us at
    XMem's stride 4 on an H200 (19 us for pooling).
    """
    factor = round(1 / ratio)
    if factor * ratio == 1 and g.shape[-2] % factor == 0 and g.shape[-1] % factor == 0:
        return per_object(lambda x: F.avg_pool2d(x, factor), g)
    return per_object(lambda x: F.interpolate(x, scale_factor=ratio, mode="area"), g)


def prepend_to_objects(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Concatenate image features (B, C, H, W) in front of each object's channels."""
    return cat_channels([x.unsqueeze(1), g])


def add_to_objects(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Add image features (B, C, H, W) to each object's features."""
    return x.unsqueeze(1) + g


def cat_channels(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate (B, K, C_i, H, W) features along channels; a part with K = 1 is shared by every object.

    Unlike `torch.cat`, which makes a 5-D result channels-first, the result
    takes the layout of the widest per-object part: channels-last features stay
    channels-last for the next convolution, with no conversion in between.
    """
    objects = max(part.shape[1] for part in parts)
    widest = max((part for part in parts if part.shape[1] == objects), key=lambda part: part.shape[2])
    batch, height, width = widest.shape[0], *widest.shape[-2:]
    flat = widest.flatten(0, 1)
    layout = torch.channels_last if flat.shape[1] > 1 and flat.is_contiguous(
        memory_format=torch.channels_last) and not flat.is_contiguous() else torch.contiguous_format
    channels = sum(part.shape[2] for part in parts)
    dtype = functools.reduce(torch.promote_types, (part.dtype for part in parts))  # as torch.cat promotes
    out = torch.empty((batch * objects, channels, height, width), dtype=dtype, device=flat.device,
                      memory_format=layout)
    out = out.view(batch, objects, channels, height, width)
    start = 0
    for part in parts:
        out[:, :, start:start + part.shape[2]] = part
        start += part.shape[2]
    return out


class GConv2D(nn.Conv2d):
    """A Conv2d applied to each object independently."""

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return per_object(super().forward, g)


class GroupResBlock(nn.Module):
    """Pre-activation residual block over per-object features, projecting the skip if widths differ."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.downsample = None if in_dim == out_dim else GConv2D(in_dim, out_dim, kernel_size=3, padding=1)
        self.conv1 = GConv2D(in_dim, out_dim, kernel_size=3, padding=1)
        self.conv2 = GConv2D(out_dim, out_dim, kernel_size=3, padding=1)

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.conv1(F.relu(g))))
        skip = g if self.downsample is None else self.downsample(g)
        return out + skip
