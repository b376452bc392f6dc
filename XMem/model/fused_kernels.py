"""Triton kernels for the passes between XMem's decoder convolutions, on channels-last (NHWC) features.

cuDNN fuses a convolution's bias and a ReLU into the convolution, but not a
bias without an activation: after each of the decoder's pre-activation blocks
PyTorch runs the bias, the residual addition and the next block's ReLU as
three more passes over the features, and each upsampling block adds its
skip projection's bias, a bilinear upsampling (two matrix products) and the
sum. At 480p one object's stride-4 features are 26.5 MB in fp32, so these
passes were about a tenth of the fp32 step's GPU time. (The ResNet stems'
max pooling is here too: PyTorch's channels-last kernel took 36 us at the key
encoder's stem, this one 16 us on an H200.) Each kernel here reads
its inputs once and writes its outputs once, in the same order of float32
additions as the torch operations (`XMem/model/fusion.py` holds those, and
picks these kernels on CUDA).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
# Plain float32 arithmetic: no fused multiply-adds, as torch's separate kernels compute.
_EXACT = {"enable_fp_fusion": False}


@triton.jit
def _shared(offsets, per_image, objects):
    """Where an element of an object's features finds the features its image shares with its other objects."""
    return offsets // per_image // objects * per_image + offsets % per_image


@triton.jit
def _bias_add_kernel(x_ptr, bias_ptr, skip_ptr, out_ptr, numel, channels, per_image, objects,
                     HAS_SKIP: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < numel
    y = tl.load(x_ptr + offsets, mask=inside).to(tl.float32)
    y = y + tl.load(bias_ptr + offsets % channels, mask=inside).to(tl.float32)
    if HAS_SKIP:
        y = y + tl.load(skip_ptr + _shared(offsets, per_image, objects), mask=inside).to(tl.float32)
    tl.store(out_ptr + offsets, y, mask=inside)


def smoke_test(device: torch.device) -> None:
    """One fused bias and residual sum, with sizes that are multiples of 16 as XMem's features' are.

    (Triton compiles again for sizes that are not: see `top_k_kernel.smoke_test`.)
    """
    x = torch.zeros(1, 16, 4, 4, device=device).contiguous(memory_format=torch.channels_last)
    bias_add(x, torch.zeros(16, device=device), x)


def bias_add(x: torch.Tensor, bias: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
    """x + bias + skip for channels-last (N, C, H, W) x and skip (or x + bias).

    `skip` may hold one image for every few of x's (features an image shares
    with all of its objects): then each of its images serves that many of x's
    in turn.
    """
    dtype = x.dtype if skip is None else torch.promote_types(x.dtype, skip.dtype)
    out = torch.empty_like(x, dtype=dtype, memory_format=torch.channels_last)
    numel = x.numel()
    _bias_add_kernel[(triton.cdiv(numel, BLOCK),)](
        x, bias, x if skip is None else skip, out, numel, x.shape[1], numel // x.shape[0],
        1 if skip is None else x.shape[0] // skip.shape[0], HAS_SKIP=skip is not None, BLOCK=BLOCK, **_EXACT)
    return out


@triton.jit
def _source(position, size):
    """Low and high source indices and the high one's weight of bilinear x2 upsampling (half-pixel centres)."""
    source = tl.maximum((position.to(tl.float32) + 0.5) * 0.5 - 0.5, 0.0)
    low = source.to(tl.int32)  # source >= 0: truncation is the floor
    high = tl.minimum(low + 1, size - 1)
    return low, high, source - low.to(tl.float32)


@triton.jit
def _nhwc_position(offsets, channels, height, width):
    """Image, row, column and channel of elements of channels-last (N, C, H, W) features."""
    pixel = offsets // channels
    return (pixel // (width * height), ((pixel // width) % height).to(tl.int32), (pixel % width).to(tl.int32),
            offsets % channels)


@triton.jit
def _upsample_add_kernel(skip_ptr, bias_ptr, g_ptr, out_ptr, relu_ptr, numel, channels, out_h, out_w, in_h, in_w,
                         objects, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < numel
    image, row, col, channel = _nhwc_position(offsets, channels, out_h, out_w)
    top, bottom, down = _source(row, in_h)
    left, right, across = _source(col, in_w)
    base = image * (in_h * in_w * channels) + channel
    top_left = tl.load(g_ptr + base + (top * in_w + left) * channels, mask=inside).to(tl.float32)
    top_right = tl.load(g_ptr + base + (top * in_w + right) * channels, mask=inside).to(tl.float32)
    bottom_left = tl.load(g_ptr + base + (bottom * in_w + left) * channels, mask=inside).to(tl.float32)
    bottom_right = tl.load(g_ptr + base + (bottom * in_w + right) * channels, mask=inside).to(tl.float32)
    upper = (1.0 - across) * top_left + across * top_right
    lower = (1.0 - across) * bottom_left + across * bottom_right
    upsampled = (1.0 - down) * upper + down * lower
    y = tl.load(skip_ptr + _shared(offsets, out_h * out_w * channels, objects), mask=inside).to(tl.float32)
    y = y + tl.load(bias_ptr + channel, mask=inside).to(tl.float32)
    y = y + upsampled
    tl.store(out_ptr + offsets, y, mask=inside)
    tl.store(relu_ptr + offsets, tl.maximum(y, 0.0), mask=inside)


def upsample_add(skip: torch.Tensor, bias: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(skip + bias + bilinear x2 upsampling of g, its ReLU) for channels-last skip (B, C, 2H, 2W), g (B*K, C, H, W).

    The skip (image features) is shared by the K objects of each image.
    """
    objects = g.shape[0] // skip.shape[0]
    out_h, out_w = skip.shape[-2:]
    dtype = torch.promote_types(skip.dtype, g.dtype)
    out = torch.empty((g.shape[0], g.shape[1], out_h, out_w), dtype=dtype, device=g.device,
                      memory_format=torch.channels_last)
    relu = torch.empty_like(out)
    numel = out.numel()
    _upsample_add_kernel[(triton.cdiv(numel, BLOCK),)](
        skip, bias, g, out, relu, numel, g.shape[1], out_h, out_w, g.shape[2], g.shape[3], objects,
        BLOCK=BLOCK, **_EXACT)
    return out, relu


@triton.jit
def _max_pool_kernel(x_ptr, out_ptr, numel, channels, in_h, in_w, out_h, out_w, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < numel
    image, row, col, channel = _nhwc_position(offsets, channels, out_h, out_w)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    for dy in tl.static_range(3):
        for dx in tl.static_range(3):
            y = 2 * row - 1 + dy
            x = 2 * col - 1 + dx
            valid = inside & (y >= 0) & (y < in_h) & (x >= 0) & (x < in_w)
            value = tl.load(x_ptr + ((image * in_h + y) * in_w + x) * channels + channel, mask=valid,
                            other=float("-inf")).to(tl.float32)
            best = tl.maximum(best, value)
    tl.store(out_ptr + offsets, best, mask=inside)


def max_pool(x: torch.Tensor) -> torch.Tensor:
    """`F.max_pool2d(x, kernel_size=3, stride=2, padding=1)` for channels-last (N, C, H, W) x (ResNet's stem)."""
    out_h, out_w = (x.shape[2] - 1) // 2 + 1, (x.shape[3] - 1) // 2 + 1
    out = torch.empty((x.shape[0], x.shape[1], out_h, out_w), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last)
    numel = out.numel()
    _max_pool_kernel[(triton.cdiv(numel, BLOCK),)](x, out, numel, x.shape[1], x.shape[2], x.shape[3], out_h, out_w,
                                                  BLOCK=BLOCK)
    return out
