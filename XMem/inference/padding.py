"""Pad frames so every side is a multiple of the network stride, and undo it."""
from __future__ import annotations

import torch
import torch.nn.functional as F

Pad = tuple[int, int, int, int]


def pad_to_multiple(image: torch.Tensor, divisor: int) -> tuple[torch.Tensor, Pad]:
    """Zero-pad the last two dimensions up to multiples of `divisor`, split evenly (extra on the far side).

    Returns the padded tensor and (left, right, top, bottom) for `unpad`.
    """
    pad = padding_to_multiple(image, divisor)
    return F.pad(image, pad), pad


def padding_to_multiple(image: torch.Tensor, divisor: int) -> Pad:
    """The (left, right, top, bottom) padding that `pad_to_multiple` adds."""
    height, width = image.shape[-2:]
    extra_h = -height % divisor
    extra_w = -width % divisor
    return extra_w // 2, extra_w - extra_w // 2, extra_h // 2, extra_h - extra_h // 2


def unpad(image: torch.Tensor, pad: Pad) -> torch.Tensor:
    """Crop away padding added by `pad_to_multiple` from the last two dimensions."""
    left, right, top, bottom = pad
    height, width = image.shape[-2:]
    return image[..., top:height - bottom, left:width - right]
