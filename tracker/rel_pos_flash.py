"""Flash attention with SAM's decomposed relative-position bias, windows included, as one Triton kernel.

SAM's encoder adds to every query-key score a row term and a column term:

    score(i, j) = q_i . k_j * scale + rel_h[i, row(j)] + rel_w[i, col(j)]

Fed through a stock fused kernel this needs either the (heads, N, N) bias in
memory or queries and keys extended by the bias terms (tripling the head size
the kernel works on). Here the two small tables are read inside the kernel,
next to each block of scores, and the head size stays 64. Keys are visited a
few whole rows at a time, so a block's column terms are one tile loaded once
per query block and its row terms one value per query and row.

Windowed blocks attend within 14x14 windows of the 64x64 token grid, which
SAM cuts out (zero-padded to 70x70) before the qkv projection and pastes back
after. This kernel finds each window's tokens in the full grid instead: a
padding token, zeros through the projection, is the projection's bias, so its
key and value are the bias vectors. Queries, keys and values are read through
their strides straight from the projection of the full grid, and the output is
written in its (B, N, heads, C) order, so nothing is partitioned or copied.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = math.log2(math.e)


@triton.jit
def _rel_pos_attention_kernel(
    q_ptr, k_ptr, v_ptr, rel_h_ptr, rel_w_ptr, k_bias_ptr, v_bias_ptr, out_ptr,
    q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn,
    rh_sb, rh_sh, rh_sn, rw_sb, rw_sh, rw_sn, o_sb, o_sh, o_sn,
    heads, qk_scale, log2e,
    HEIGHT: tl.constexpr, WIDTH: tl.constexpr, WINDOW: tl.constexpr, WINDOWS_X: tl.constexpr,
    WINDOWS_Y: tl.constexpr, HEAD_DIM: tl.constexpr, COLS: tl.constexpr, ROWS_PER_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """BLOCK_M queries of one window of one (image, head) against that window's keys, softmax in base 2."""
    BLOCK_N: tl.constexpr = ROWS_PER_BLOCK * COLS
    block = tl.program_id(0)
    item = tl.program_id(1)
    head = item % heads
    window = (item // heads) % (WINDOWS_X * WINDOWS_Y)
    image = item // heads // (WINDOWS_X * WINDOWS_Y)
    top = (window // WINDOWS_X) * WINDOW
    left = (window % WINDOWS_X) * WINDOW
    d = tl.arange(0, HEAD_DIM)

    m = block * BLOCK_M + tl.arange(0, BLOCK_M)  # query index inside the window, row-major
    qy = top + m // WINDOW
    qx = left + m % WINDOW
    q_valid = (m < WINDOW * WINDOW) & (qy < HEIGHT) & (qx < WIDTH)
    q_token = tl.where(q_valid, qy * WIDTH + qx, 0)
    q = tl.load(q_ptr + image * q_sb + head * q_sh + q_token[:, None] * q_sn + d[None, :], mask=q_valid[:, None],
                other=0.0)
    rel_h = rel_h_ptr + image * rh_sb + head * rh_sh + q_token * rh_sn
    rel_w = rel_w_ptr + image * rw_sb + head * rw_sh + q_token * rw_sn

    col = tl.arange(0, COLS)
    col_bias = tl.load(rel_w[:, None] + col[None, :], mask=q_valid[:, None] & (col < WINDOW)[None, :], other=0.0)
    col_bias = tl.reshape(tl.broadcast_to((col_bias.to(tl.float32) * log2e)[:, None, :],
                                          (BLOCK_M, ROWS_PER_BLOCK, COLS)), (BLOCK_M, BLOCK_N))
    j = tl.arange(0, BLOCK_N)
    k_bias = tl.load(k_bias_ptr + head * HEAD_DIM + d)
    v_bias = tl.load(v_bias_ptr + head * HEAD_DIM + d)
    k_base = k_ptr + image * k_sb + head * k_sh
    v_base = v_ptr + image * v_sb + head * v_sh

    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for row0 in range(0, WINDOW, ROWS_PER_BLOCK):
        key_row = row0 + j // COLS
        key_col = j % COLS
        in_window = (key_row < WINDOW) & (key_col < WINDOW)
        ky = top + key_row
        kx = left + key_col
        in_image = in_window & (ky < HEIGHT) & (kx < WIDTH)
        k_token = tl.where(in_image, ky * WIDTH + kx, 0)
        k = tl.load(k_base + k_token[None, :] * k_sn + d[:, None], mask=in_image[None, :], other=0.0)
        k = tl.where(in_image[None, :], k, k_bias[:, None].to(k.dtype))
        scores = tl.dot(q, k) * qk_scale + col_bias
        rows = row0 + tl.arange(0, ROWS_PER_BLOCK)
        row_bias = tl.load(rel_h[:, None] + rows[None, :], mask=q_valid[:, None] & (rows < WINDOW)[None, :],
                           other=0.0)
        scores += tl.reshape(tl.broadcast_to((row_bias.to(tl.float32) * log2e)[:, :, None],
                                             (BLOCK_M, ROWS_PER_BLOCK, COLS)), (BLOCK_M, BLOCK_N))
        scores = tl.where(in_window[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, 1))
        p = tl.exp2(scores - new_best[:, None])
        shrink = tl.exp2(best - new_best)
        total = total * shrink + tl.sum(p, 1)
        v = tl.load(v_base + k_token[:, None] * v_sn + d[None, :], mask=in_image[:, None], other=0.0)
        v = tl.where(in_image[:, None], v, v_bias[None, :].to(v.dtype))
        acc = acc * shrink[:, None] + tl.dot(p.to(v.dtype), v)
        best = new_best
    out = acc / total[:, None]
    tl.store(out_ptr + image * o_sb + head * o_sh + q_token[:, None] * o_sn + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_valid[:, None])


def rel_pos_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor,
                      scale: float, height: int, width: int, window: int, k_bias: torch.Tensor,
                      v_bias: torch.Tensor) -> torch.Tensor:
    """Attention of a (height x width) token grid within `window`-sized windows (window = height: global).

    q, k, v: (B, heads, N, C) with unit stride along C, any other strides;
    rel_h, rel_w: (B, heads, N, window), each query's row and column terms
    against the rows and columns of its window, unit stride along the last
    axis; k_bias, v_bias: (heads * C,), the key and value of a padding token.
    Returns (B, N, heads, C), contiguous.
    """
    batch, heads, tokens, head_dim = q.shape
    if height * width != tokens:
        raise ValueError(f"{tokens} tokens are not a {height}x{width} grid")
    for name, t in (("q", q), ("k", k), ("v", v), ("rel_h", rel_h), ("rel_w", rel_w)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs unit stride along its last axis")
    out = torch.empty(batch, tokens, heads, head_dim, device=q.device, dtype=q.dtype)
    cols = triton.next_power_of_2(window)
    rows_per_block = max(1, 64 // cols)
    block_m = 64 if window * window >= 1024 else 128  # the fastest of a sweep on an H200 (global: 226 us)
    windows_y, windows_x = -(-height // window), -(-width // window)
    grid = (triton.cdiv(window * window, block_m), batch * windows_y * windows_x * heads)
    _rel_pos_attention_kernel[grid](
        q, k, v, rel_h, rel_w, k_bias, v_bias, out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), rel_h.stride(0), rel_h.stride(1), rel_h.stride(2),
        rel_w.stride(0), rel_w.stride(1), rel_w.stride(2), out.stride(0), out.stride(2), out.stride(1),
        heads, scale * LOG2E, LOG2E,
        HEIGHT=height, WIDTH=width, WINDOW=window, WINDOWS_X=windows_x, WINDOWS_Y=windows_y, HEAD_DIM=head_dim,
        COLS=cols, ROWS_PER_BLOCK=rows_per_block, BLOCK_M=block_m,
        num_warps=4, num_stages=3,
    )
    return out
