"""SAM's image encoder for half-precision inference on CUDA: a copy whose attention is one Triton kernel.

Under autocast at 1024x1024 the encoder's matrix products took a fifth of its
time on a Hopper GPU; the rest was weight and activation casts, copies that
cut the token grid into windows and paste it back, attention on queries
extended by the bias terms, and a slow convolution algorithm for the 16x16
patch embedding. The copy computes the same functions: weights cast once, the
patch embedding as one matrix product over the image's patches, and windows
found inside the attention kernel (`tracker.rel_pos_flash`), so each block is
two layer norms, four matrix products, the kernel and two residual additions.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .sam_attention import FusedRelPosAttention, relative_terms
from .segment_anything_compat import image_encoder

try:
    from .rel_pos_flash import rel_pos_attention
except ImportError:  # no Triton: half precision runs the autocast route
    rel_pos_attention = None


def kernel_runs(encoder: nn.Module) -> bool:
    """Whether `half_precision_encoder` can make a copy of this encoder: Triton is installed, and every block
    has relative positions and a head size the kernel takes (SAM ViT-B's 64)."""
    blocks = getattr(encoder, "blocks", [])
    return rel_pos_attention is not None and len(blocks) > 0 and all(
        type(block.attn) in (image_encoder.Attention, FusedRelPosAttention) and block.attn.use_rel_pos
        and block.attn.qkv.out_features // 3 // block.attn.num_heads in (16, 32, 64, 128) for block in blocks)


class PatchEmbedding(nn.Module):
    """SAM's PatchEmbed (a convolution with kernel = stride = patch size) as one matrix product: same sums."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.patch = conv.kernel_size[0]
        self.weight = nn.Parameter(conv.weight.detach().reshape(conv.out_channels, -1).clone(), requires_grad=False)
        self.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, H/p, W/p, C), channels last as PatchEmbed returns them."""
        batch, channels, height, width = x.shape
        p = self.patch
        patches = x.reshape(batch, channels, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)
        return F.linear(patches.reshape(batch, height // p, width // p, channels * p * p), self.weight, self.bias)


class GridAttention(image_encoder.Attention):
    """Attention over the whole token grid; a windowed block's windows are picked out inside the kernel."""

    window: int  # 0: global attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        window = self.window or height
        if not self.window and height != width:
            raise ValueError(f"global attention here needs a square token grid, not {height}x{width}")
        qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1)
        q, k, v = qkv.transpose(1, 3).unbind(2)  # (B, heads, N, C) views of the projection
        rel_h, rel_w = relative_terms(q, height, width, self.rel_pos_h, self.rel_pos_w, self.window)
        if self.qkv.bias is not None:
            _, k_bias, v_bias = self.qkv.bias.view(3, -1)
        else:
            k_bias = v_bias = torch.zeros(q.shape[1] * q.shape[3], device=x.device, dtype=x.dtype)
        out = rel_pos_attention(q, k, v, rel_h, rel_w, self.scale, height, width, window, k_bias, v_bias)
        return self.proj(out.view(batch, height, width, -1))


class GridBlock(image_encoder.Block):
    """A transformer block without window partitioning: its GridAttention handles the windows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def half_precision_encoder(encoder: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of SAM's ImageEncoderViT in `dtype` (fp16 or bf16) on its device; `encoder` is untouched.

    Only for encoders `kernel_runs` accepts.
    """
    if not kernel_runs(encoder):
        raise ValueError("the kernel encoder needs Triton and SAM's attention blocks with relative positions "
                         "and a head size of 16, 32, 64 or 128")
    fast = copy.deepcopy(encoder).to(dtype).eval()
    fast.patch_embed = PatchEmbedding(fast.patch_embed.proj)
    for block in fast.blocks:
        block.__class__ = GridBlock
        block.attn.__class__ = GridAttention
        block.attn.window = block.window_size
    return fast
