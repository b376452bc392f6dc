"""SAM's image-encoder attention through one fused kernel, with the same maths.

The reference adds its decomposed relative-position bias to a materialised
(heads, N, N) attention matrix: 800 MB per global block at 1024x1024 in fp32,
and several passes over it. Here the bias rides along inside the dot product:
each query is extended with its row and column bias terms, each key with a
one-hot of its row and column, so that

    [q * scale, rel_h(q), rel_w(q)] . [k, onehot_row(k), onehot_col(k)]
        = q . k * scale + rel_h(q)[row(k)] + rel_w(q)[col(k)]

and `scaled_dot_product_attention` (flash or memory-efficient kernels, never
the N x N matrix) does the rest. Weights and checkpoints are untouched.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .segment_anything_compat import image_encoder


def relative_positions(size: int, table: torch.Tensor) -> torch.Tensor:
    """(size, size, C): the learned embedding of every query-key offset along one axis.

    SAM's `get_rel_pos` for equal query and key sizes, with its index built on
    the table's device (SAM's comes from the CPU, a copy that a CUDA graph
    cannot capture).
    """
    if table.shape[0] != 2 * size - 1:  # SAM interpolates the table first; never at its own input size
        return image_encoder.get_rel_pos(size, size, table)
    coords = torch.arange(size, device=table.device)
    return table[coords[:, None] - coords[None, :] + (size - 1)]


def relative_terms(q: torch.Tensor, height: int, width: int, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                   window: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's row and column bias terms from unscaled (B, heads, N) queries of a height x width grid.

    Against the grid's rows and columns, (B, heads, N, H) and (B, heads, N, W);
    with `window`, against the rows and columns of the query's own window of
    the grid cut into window x window windows, (B, heads, N, window) each.
    """
    batch, heads, tokens, channels = q.shape
    rows = relative_positions(window or height, rel_pos_h)  # (query row, key row, C)
    cols = relative_positions(window or width, rel_pos_w)
    if window:
        rows = rows[torch.arange(height, device=q.device) % window]
        cols = cols[torch.arange(width, device=q.device) % window]
    grid = q.reshape(batch, heads, height, width, channels)
    rel_h = torch.einsum("bnyxc,ykc->bnyxk", grid, rows.to(q.dtype))
    rel_w = torch.einsum("bnyxc,xkc->bnyxk", grid, cols.to(q.dtype))
    return rel_h.reshape(batch, heads, tokens, -1), rel_w.reshape(batch, heads, tokens, -1)


def _padded(x: torch.Tensor, size: int) -> torch.Tensor:
    return x if x.shape[-1] == size else F.pad(x, (0, size - x.shape[-1]))


class FusedRelPosAttention(image_encoder.Attention):
    """`segment_anything`'s Attention with its forward pass through scaled_dot_product_attention."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        tokens = height * width
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, C)
        if self.use_rel_pos:
            rel_h, rel_w = relative_terms(q, height, width, self.rel_pos_h, self.rel_pos_w)
            index = torch.arange(tokens, device=x.device)
            one_hot_row = F.one_hot(index // width, height).to(k.dtype).expand(batch, self.num_heads, -1, -1)
            one_hot_col = F.one_hot(index % width, width).to(k.dtype).expand(batch, self.num_heads, -1, -1)
            q = torch.cat([q * self.scale, rel_h.to(q.dtype), rel_w.to(q.dtype)], dim=-1)
            k = torch.cat([k, one_hot_row, one_hot_col], dim=-1)
            scale = 1.0
        else:
            scale = self.scale
        # Fused kernels want one head size for q, k and v, a multiple of 8.
        size = -(-max(q.shape[-1], v.shape[-1]) // 8) * 8
        out = F.scaled_dot_product_attention(_padded(q, size), _padded(k, size), _padded(v, size), scale=scale)
        out = out[..., :v.shape[-1]]
        out = out.permute(0, 2, 1, 3).reshape(batch, height, width, -1)
        return self.proj(out)


def use_fused_attention(encoder: torch.nn.Module) -> int:
    """Switch every attention block of a SAM image encoder to the fused forward; returns how many."""
    count = 0
    for module in encoder.modules():
        if type(module) is image_encoder.Attention:
            module.__class__ = FusedRelPosAttention
            count += 1
    return count
