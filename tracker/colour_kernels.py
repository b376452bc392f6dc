"""The per-frame pixel work around XMem as three Triton kernels: YUV 4:2:0 -> RGB, the overlay, RGB -> YUV 4:2:0.

Written with torch operations these are about 90 small kernels a frame (the
chroma filter alone a cuDNN convolution with two layout conversions), most of
the 0.69 ms of GPU time a 720p frame took around each XMem step. Each kernel
here reads its input once and writes its output once.

They compute what `tracker.colour` and `tracker.render.overlay` compute, in
the same order of float32 operations, with IEEE division and no fused
multiply-adds. The overlay gives the same bytes. The conversions stay within
one code of torch's: the conversion to YUV sums its terms in a fixed order
where torch's matrix product and convolution pick theirs, and torch on CUDA
divides by multiplying with the reciprocal (in Triton's interpreter the
conversion to RGB gives the CPU's bytes exactly).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


BLOCK = 1024
# The overlay kernels unroll their windows (each outline width is compiled once): wider outlines use torch.
MAX_OUTLINE = 10
# 1.5 * 2**23: adding it and taking it away rounds a float32 to the nearest even integer.
_ROUNDER = tl.constexpr(12582912.0)
# Exact float32 arithmetic, as torch's separate element-wise kernels do it.
_EXACT = {"enable_fp_fusion": False}


@triton.jit
def _round_even(x):
    return (x + _ROUNDER) - _ROUNDER


@triton.jit
def _code(x):
    """float32 -> uint8 as `round_().clamp_(0, 255).to(torch.uint8)`."""
    return tl.minimum(tl.maximum(_round_even(x), 0.0), 255.0).to(tl.uint8)


@triton.jit
def _upsampled(plane_ptr, near_row, far_row, near_col, far_col, row_weight, col_weight, mask):
    """A chroma plane's code at a pixel, from its own sample and the nearest others (see `colour._upsampled`)."""
    own = tl.load(plane_ptr + near_row + near_col, mask=mask, other=0).to(tl.float32)
    across = tl.load(plane_ptr + near_row + far_col, mask=mask, other=0).to(tl.float32)
    down = tl.load(plane_ptr + far_row + near_col, mask=mask, other=0).to(tl.float32)
    diagonal = tl.load(plane_ptr + far_row + far_col, mask=mask, other=0).to(tl.float32)
    return row_weight * (col_weight * own + (1.0 - col_weight) * across) + \
        (1.0 - row_weight) * (col_weight * down + (1.0 - col_weight) * diagonal)


@triton.jit
def _yuv420_to_rgb_kernel(planes_ptr, out_ptr, height, width, offset, luma_span, chroma_span,
                          r_from_v, g_from_u, g_from_v, b_from_u, even_col_weight, odd_col_weight,
                          top_even_weight, top_odd_weight, bottom_even_weight, bottom_odd_weight, fields,
                          BLOCK: tl.constexpr):
    pixel = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = pixel < height * width
    row = pixel // width
    col = pixel % width
    # The pixel's own chroma sample, the nearest other one (of its field: `fields` is 2 in an interlaced
    # picture) along each side and the own one's weights (see `colour._neighbours`).
    half_width = width // 2
    field = row % fields
    line = row // fields
    near_line = line // 2
    far_line = tl.minimum(tl.maximum(near_line + (line % 2) * 2 - 1, 0), height // 2 // fields - 1)
    near_row = near_line * fields + field
    far_row = far_line * fields + field
    near_col = col // 2
    far_col = tl.minimum(tl.maximum(near_col + (col % 2) * 2 - 1, 0), half_width - 1)
    odd_line = line % 2 == 1
    row_weight = tl.where(field == 1, tl.where(odd_line, bottom_odd_weight, bottom_even_weight),
                          tl.where(odd_line, top_odd_weight, top_even_weight))
    col_weight = tl.where(col % 2 == 1, odd_col_weight, even_col_weight)
    luma_size = height * width
    y = tl.load(planes_ptr + pixel, mask=inside, other=0).to(tl.float32)
    u_ptr = planes_ptr + luma_size
    v_ptr = u_ptr + luma_size // 4
    u = _upsampled(u_ptr, near_row * half_width, far_row * half_width, near_col, far_col, row_weight, col_weight,
                   inside)
    v = _upsampled(v_ptr, near_row * half_width, far_row * half_width, near_col, far_col, row_weight, col_weight,
                   inside)
    y = tl.div_rn(y - offset, luma_span)
    pb = tl.div_rn(u - 128.0, chroma_span)
    pr = tl.div_rn(v - 128.0, chroma_span)
    red = y + pr * r_from_v
    green = (y + pb * g_from_u) + pr * g_from_v
    blue = y + pb * b_from_u
    tl.store(out_ptr + pixel * 3, _code(red * 255.0), mask=inside)
    tl.store(out_ptr + pixel * 3 + 1, _code(green * 255.0), mask=inside)
    tl.store(out_ptr + pixel * 3 + 2, _code(blue * 255.0), mask=inside)


def yuv420_to_rgb(planes: torch.Tensor, height: int, width: int, rows: tuple, offset: float, luma_span: float,
                  chroma_span: float, across: tuple[float, float], down: tuple[tuple[float, float], ...]
                  ) -> torch.Tensor:
    """Packed (H * 3 / 2, W) yuv420p planes -> HxWx3 uint8 RGB; `rows` as `colour._rgb_from_yuv_matrix` gives
    them, `across` (one field's) and `down` (per field) as `colour._siting_weights`."""
    out = torch.empty(height, width, 3, dtype=torch.uint8, device=planes.device)
    grid = (triton.cdiv(height * width, BLOCK),)
    _yuv420_to_rgb_kernel[grid](planes.contiguous(), out, height, width, offset, luma_span, chroma_span,
                                rows[0][2], rows[1][1], rows[1][2], rows[2][1], *across, *down[0], *down[-1],
                                len(down), BLOCK=BLOCK, **_EXACT)
    return out


@triton.jit
def _luma(image_ptr, row, col, height, width, kr, kg, kb, mask):
    """(luma, B - luma, R - luma) of the coded picture's pixel, odd sides repeating the last row or column."""
    at = (tl.minimum(tl.maximum(row, 0), height - 1) * width + tl.minimum(col, width - 1)) * 3
    red = tl.div_rn(tl.load(image_ptr + at, mask=mask, other=0).to(tl.float32), 255.0)
    green = tl.div_rn(tl.load(image_ptr + at + 1, mask=mask, other=0).to(tl.float32), 255.0)
    blue = tl.div_rn(tl.load(image_ptr + at + 2, mask=mask, other=0).to(tl.float32), 255.0)
    luma = (kr * red + kg * green) + kb * blue
    return luma, blue - luma, red - luma


@triton.jit
def _chroma_pair(image_ptr, row, col, height, width, kr, kg, kb, mask):
    """The mean B - luma and R - luma of the horizontal pair at (row, col), (row, col + 1)."""
    _, blue_0, red_0 = _luma(image_ptr, row, col, height, width, kr, kg, kb, mask)
    _, blue_1, red_1 = _luma(image_ptr, row, col + 1, height, width, kr, kg, kb, mask)
    return (blue_0 + blue_1) * 0.5, (red_0 + red_1) * 0.5


@triton.jit
def _rgb_to_yuv420_kernel(image_ptr, planes_ptr, height, width, coded_height, coded_width, kr, kg, kb,
                          u_scale, v_scale, offset, luma_span, chroma_span, BLOCK: tl.constexpr):
    """One chroma sample per lane: its 2x2 block's four luma codes and its U and V codes."""
    sample = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    half_width = coded_width // 2
    chroma_size = (coded_height // 2) * half_width
    inside = sample < chroma_size
    top = (sample // half_width) * 2
    left = (sample % half_width) * 2
    for dy in tl.static_range(2):
        for dx in tl.static_range(2):
            luma, _, _ = _luma(image_ptr, top + dy, left + dx, height, width, kr, kg, kb, inside)
            tl.store(planes_ptr + (top + dy) * coded_width + left + dx, _code(luma * luma_span + offset), mask=inside)
    # swscale's chroma: pairs averaged along the row, then [1, 3, 3, 1] / 8 down rows top - 1 .. top + 2
    # (rows beyond the picture repeat its edge).
    blue_a, red_a = _chroma_pair(image_ptr, top - 1, left, height, width, kr, kg, kb, inside)
    blue_b, red_b = _chroma_pair(image_ptr, top, left, height, width, kr, kg, kb, inside)
    blue_c, red_c = _chroma_pair(image_ptr, top + 1, left, height, width, kr, kg, kb, inside)
    blue_d, red_d = _chroma_pair(image_ptr, top + 2, left, height, width, kr, kg, kb, inside)
    blue = ((0.125 * blue_a + 0.375 * blue_b) + 0.375 * blue_c) + 0.125 * blue_d
    red = ((0.125 * red_a + 0.375 * red_b) + 0.375 * red_c) + 0.125 * red_d
    luma_size = coded_height * coded_width
    tl.store(planes_ptr + luma_size + sample, _code(tl.div_rn(blue, u_scale) * chroma_span + 128.0), mask=inside)
    tl.store(planes_ptr + luma_size + chroma_size + sample, _code(tl.div_rn(red, v_scale) * chroma_span + 128.0),
             mask=inside)


def rgb_to_yuv420(image: torch.Tensor, kr: float, kb: float, offset: float, luma_span: float,
                  chroma_span: float) -> torch.Tensor:
    """HxWx3 uint8 RGB -> packed yuv420p planes (coded H * 3 / 2, coded W), odd sides padded by repetition."""
    height, width = image.shape[:2]
    coded_height, coded_width = height + height % 2, width + width % 2
    planes = torch.empty(coded_height * 3 // 2, coded_width, dtype=torch.uint8, device=image.device)
    grid = (triton.cdiv(coded_height * coded_width // 4, BLOCK),)
    _rgb_to_yuv420_kernel[grid](image.contiguous(), planes, height, width, coded_height, coded_width,
                                kr, 1.0 - kr - kb, kb, 2 * (1 - kb), 2 * (1 - kr), offset, luma_span, chroma_span,
                                BLOCK=BLOCK, **_EXACT)
    return planes


@triton.jit
def _row_extremes_kernel(ids_ptr, lows_ptr, highs_ptr, height, width, OUTLINE: tl.constexpr, BLOCK: tl.constexpr):
    """The smallest and largest label within `OUTLINE` pixels on each pixel's row (cut at the border)."""
    pixel = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = pixel < height * width
    col = pixel % width
    low = tl.load(ids_ptr + pixel, mask=inside, other=0)
    high = low
    for dx in tl.static_range(-OUTLINE, OUTLINE + 1):
        near = inside & (col + dx >= 0) & (col + dx < width)
        low = tl.minimum(low, tl.load(ids_ptr + pixel + dx, mask=near, other=255))
        high = tl.maximum(high, tl.load(ids_ptr + pixel + dx, mask=near, other=0))
    tl.store(lows_ptr + pixel, low, mask=inside)
    tl.store(highs_ptr + pixel, high, mask=inside)


@triton.jit
def _overlay_kernel(image_ptr, ids_ptr, lows_ptr, highs_ptr, colours_ptr, weights_ptr, out_ptr, height, width,
                    OUTLINE: tl.constexpr, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    pixel = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = pixel < height * width
    row = pixel // width
    ids = tl.load(ids_ptr + pixel, mask=inside, other=0).to(tl.int32)
    # An edge pixel has another label within `outline` pixels (a square window cut at the picture's border):
    # the window's smallest and largest labels differ. Columns of the rows' extremes give the window's.
    low = tl.full([BLOCK], 255, dtype=tl.uint8)
    high = tl.zeros([BLOCK], dtype=tl.uint8)
    for dy in tl.static_range(-OUTLINE, OUTLINE + 1):
        near = inside & (row + dy >= 0) & (row + dy < height)
        low = tl.minimum(low, tl.load(lows_ptr + pixel + dy * width, mask=near, other=255))
        high = tl.maximum(high, tl.load(highs_ptr + pixel + dy * width, mask=near, other=0))
    key = ids + 256 * ((low != high) & (ids > 0)).to(tl.int32)
    weight = tl.load(weights_ptr + key, mask=inside, other=0).to(tl.int32)
    for channel in tl.static_range(3):
        value = tl.load(image_ptr + pixel * 3 + channel, mask=inside, other=0).to(tl.int32)
        colour = tl.load(colours_ptr + key * 3 + channel, mask=inside, other=0).to(tl.int32)
        mixed = value * ((1 << SHIFT) - weight) + colour * weight + (1 << (SHIFT - 1))
        tl.store(out_ptr + pixel * 3 + channel, (mixed >> SHIFT).to(tl.uint8), mask=inside)


def overlay(image: torch.Tensor, ids: torch.Tensor, colours: torch.Tensor, weights: torch.Tensor, outline: int,
            shift: int) -> torch.Tensor:
    """`render.overlay` for HxWx3 uint8 `image` and HxW uint8 `ids`, with its (512, 3) colour and weight tables.

    Two passes over the labels (rows, then columns of the rows' extremes), so
    a window costs 2 * (2 * outline + 1) reads a pixel, not its area.
    """
    height, width = ids.shape
    ids = ids.contiguous()
    out = torch.empty_like(image)
    grid = (triton.cdiv(height * width, BLOCK),)
    lows, highs = ids, ids  # no outline: the window is the pixel itself
    if outline > 0:
        lows, highs = torch.empty_like(ids), torch.empty_like(ids)
        _row_extremes_kernel[grid](ids, lows, highs, height, width, OUTLINE=outline, BLOCK=BLOCK)
    _overlay_kernel[grid](image.contiguous(), ids, lows, highs, colours.contiguous(), weights.contiguous(), out,
                          height, width, OUTLINE=outline, SHIFT=shift, BLOCK=BLOCK)
    return out


def smoke_test(device: torch.device) -> None:
    """One conversion on `device`: Triton compiles there only with a C compiler for its launcher.

    16 x 16, so that Triton compiles the variant most videos use (sides that are multiples of 16;
    see `top_k_kernel.smoke_test`).
    """
    planes = torch.zeros(24, 16, dtype=torch.uint8, device=device)
    yuv420_to_rgb(planes, 16, 16, ((1.0, 0.0, 1.0), (1.0, -0.5, -0.5), (1.0, 1.0, 0.0)), 16.0, 219.0, 224.0,
                  (0.75, 0.75), ((0.75, 0.75),))
