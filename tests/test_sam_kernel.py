"""The Triton attention kernel and the half-precision SAM encoder built on it, against SAM's own maths.

On a machine without a GPU the kernel runs in Triton's interpreter (numpy on
the CPU), in a child process: the interpreter must be chosen before the
kernel is defined, and no other test should run under it. On CUDA it also
runs compiled.
"""
import copy
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (grid side, window, batch): global attention, SAM's 14-token windows on a grid they do not divide
# (padding tokens in the last windows), and windows that divide the grid.
ATTENTION_CASES = [(16, 16, 1), (20, 7, 2), (12, 6, 1)]


def dense_attention(q, k, v, rel_h, rel_w, scale, side, window):
    """The reference in float64: SAM's windows cut out (padding tokens = the bias key/value), full softmax."""
    batch, heads, tokens, channels = q.shape
    k_bias, v_bias = torch.randn(2, heads, channels, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    out = torch.zeros(batch, tokens, heads, channels, dtype=torch.float64)
    padded = -(-side // window) * window
    for top in range(0, padded, window):
        for left in range(0, padded, window):
            ys, xs = torch.meshgrid(torch.arange(top, top + window), torch.arange(left, left + window), indexing="ij")
            ys, xs = ys.reshape(-1), xs.reshape(-1)
            inside = (ys < side) & (xs < side)
            index = (ys.clamp(max=side - 1) * side + xs.clamp(max=side - 1))
            kw = torch.where(inside[:, None], k[:, :, index], k_bias[None, :, None])
            vw = torch.where(inside[:, None], v[:, :, index], v_bias[None, :, None])
            qw = q[:, :, index]
            local_rows = torch.arange(window).repeat_interleave(window)
            local_cols = torch.arange(window).repeat(window)
            bias = rel_h[:, :, index][..., local_rows] + rel_w[:, :, index][..., local_cols]
            weights = torch.softmax(qw @ kw.transpose(-1, -2) * scale + bias, dim=-1)
            result = (weights @ vw).transpose(1, 2)
            out[:, index[inside]] = result[:, inside]
    return out, k_bias, v_bias


def check_attention(device: str, dtype: torch.dtype) -> float:
    """Largest relative error of the kernel over ATTENTION_CASES."""
    from tracker.rel_pos_flash import rel_pos_attention
    worst = 0.0
    for side, window, batch in ATTENTION_CASES:
        g = torch.Generator().manual_seed(side * window)
        heads, channels, tokens = 2, 64, side * side
        qkv = torch.randn(batch, tokens, 3, heads, channels, generator=g, dtype=torch.float64)
        q, k, v = qkv.transpose(1, 3).unbind(2)
        rel_h = torch.randn(batch, heads, tokens, window, generator=g, dtype=torch.float64)
        rel_w = torch.randn(batch, heads, tokens, window, generator=g, dtype=torch.float64)
        want, k_bias, v_bias = dense_attention(q, k, v, rel_h, rel_w, channels ** -0.5, side, window)
        cast = [t.to(device, dtype) for t in (qkv, rel_h, rel_w, k_bias.reshape(-1), v_bias.reshape(-1))]
        q, k, v = cast[0].transpose(1, 3).unbind(2)
        got = rel_pos_attention(q, k, v, cast[1], cast[2], channels ** -0.5, side, side, window, cast[3], cast[4])
        assert got.shape == want.shape and torch.isfinite(got).all()
        worst = max(worst, ((got.double().cpu() - want).norm() / want.norm()).item())
    return worst


def small_encoder():
    """A two-block SAM ViT (one windowed block with padding, one global) with relative positions that matter."""
    from tracker.segment_anything_compat import image_encoder
    torch.manual_seed(0)
    encoder = image_encoder.ImageEncoderViT(img_size=320, patch_size=16, embed_dim=128, depth=2, num_heads=2,
                                            global_attn_indexes=(1,), window_size=7, use_rel_pos=True, out_chans=32)
    with torch.no_grad():
        for block in encoder.blocks:
            block.attn.rel_pos_h.normal_(0, 0.3)
            block.attn.rel_pos_w.normal_(0, 0.3)
        encoder.pos_embed.normal_(0, 0.1)
    return encoder.eval()


def check_encoder(device: str, dtype: torch.dtype) -> float:
    """Relative error of the half-precision kernel encoder against SAM's encoder in float64."""
    from tracker.sam_encoder import half_precision_encoder
    encoder = small_encoder()
    x = torch.randn(1, 3, 320, 320, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = copy.deepcopy(encoder).double()(x.double())
        fast = half_precision_encoder(encoder.to(device), dtype)
        got = fast(x.to(device, dtype))
        untouched = encoder(x.to(device))
    assert next(encoder.parameters()).dtype == torch.float32 and untouched.dtype == torch.float32
    return ((got.double().cpu() - want).norm() / want.norm()).item()


def test_the_kernel_encoder_is_only_made_where_the_kernel_applies():
    from tracker.sam_encoder import half_precision_encoder, kernel_runs
    from tracker.segment_anything_compat import image_encoder
    assert kernel_runs(small_encoder()) == (importlib.util.find_spec("triton") is not None)
    shape = dict(img_size=64, patch_size=16, depth=1, out_chans=8, window_size=2)
    without_positions = image_encoder.ImageEncoderViT(embed_dim=128, num_heads=2, use_rel_pos=False, **shape)
    head_size_80 = image_encoder.ImageEncoderViT(embed_dim=160, num_heads=2, use_rel_pos=True, **shape)
    for encoder in (without_positions, head_size_80):
        assert not kernel_runs(encoder)
        with pytest.raises(ValueError, match="kernel encoder needs"):
            half_precision_encoder(encoder, torch.float16)


CHECKS = {"attention": check_attention, "encoder": check_encoder}
# fp16 keeps 11 bits (errors near 1e-3 seen), bf16 8 (near 8e-3)
TOLERANCE = {torch.float16: 4e-3, torch.bfloat16: 3e-2}


@needs_triton
@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("dtype", ["float16"])  # the interpreter's bf16 matrix products are wrong (Triton 3.6)
def test_kernel_in_the_triton_interpreter(check, dtype):
    result = subprocess.run([sys.executable, __file__, check, dtype], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 0, result.stdout + result.stderr
    error = float(result.stdout.split()[-1])
    assert error < TOLERANCE[getattr(torch, dtype)]


@needs_cuda
@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_on_cuda(check, dtype):
    assert CHECKS[check]("cuda", dtype) < TOLERANCE[dtype]


if __name__ == "__main__":  # the child process of test_kernel_in_the_triton_interpreter
    sys.path.insert(0, os.getcwd())
    print(CHECKS[sys.argv[1]]("cpu", getattr(torch, sys.argv[2])))
