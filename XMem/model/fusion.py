"""Inference-only rewrites of a trained XMem that keep its maths: folded batch norms, fused residual blocks,
channels-last weights.

In evaluation a BatchNorm2d is a per-channel affine map, so the convolution
before it can absorb it: W' = W * g / sqrt(v + eps), b' = (b - m) * g / sqrt(v + eps) + beta.
A folded block is then convolution + bias + ReLU (+ residual), which cuDNN
runs as one kernel per convolution instead of four passes over the feature
map. Results change only in the order of rounding.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import BasicBlock, Bottleneck


@torch.no_grad()
def fold_batch_norm(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> nn.Conv2d:
    """A convolution (with bias) equal to `norm(conv(x))` for a norm in evaluation mode."""
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                      device=conv.weight.device, dtype=conv.weight.dtype)
    fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
    fused.bias.copy_((bias - norm.running_mean) * scale + norm.bias)
    return fused


def _fold_pairs(module: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(parent, conv name, norm name) of every BatchNorm2d that directly follows a plain convolution.

    Pairs are found the way ResNets name them: `convN` with `bnN` in one
    module, and a Conv2d followed by a BatchNorm2d inside a Sequential.
    """
    pairs = []
    for parent in module.modules():
        children = dict(parent.named_children())
        if isinstance(parent, nn.Sequential):
            names = list(children)
            candidates = list(zip(names, names[1:]))
        else:
            candidates = [(name, "bn" + name[4:]) for name in children if name.startswith("conv")]
        for conv_name, norm_name in candidates:
            conv, norm = children.get(conv_name), children.get(norm_name)
            if type(conv) is nn.Conv2d and type(norm) is nn.BatchNorm2d and norm.track_running_stats:
                pairs.append((parent, conv_name, norm_name))
    return pairs


def fold_batch_norms(module: nn.Module) -> int:
    """Fold, in place, every BatchNorm2d that directly follows a convolution; returns how many.

    The module must be in evaluation mode (training updates the statistics).
    """
    if module.training:
        raise ValueError("fold batch norms only into a network in evaluation mode")
    pairs = _fold_pairs(module)
    for parent, conv_name, norm_name in pairs:
        setattr(parent, conv_name, fold_batch_norm(getattr(parent, conv_name), getattr(parent, norm_name)))
        setattr(parent, norm_name, nn.Identity())
    return len(pairs)


def _conv_relu(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """relu(conv(x)); on CUDA one cuDNN kernel, the bias and the activation in its epilogue."""
    if not x.is_cuda:
        return F.relu(conv(x))
    return torch.cudnn_convolution_relu(x, conv.weight.to(x.dtype), conv.bias.to(x.dtype), conv.stride,
                                        conv.padding, conv.dilation, conv.groups)


def _conv_add_relu(conv: nn.Conv2d, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """relu(conv(x) + skip); on CUDA one cuDNN kernel."""
    if not x.is_cuda:
        return F.relu(conv(x) + skip)
    return torch.cudnn_convolution_add_relu(x, conv.weight.to(x.dtype), skip.to(x.dtype), 1.0,
                                            conv.bias.to(x.dtype), conv.stride, conv.padding, conv.dilation,
                                            conv.groups)


class _FusedBottleneck(Bottleneck):
    """A Bottleneck whose batch norms were folded: three fused convolutions."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _conv_relu(self.conv2, _conv_relu(self.conv1, x))
        skip = x if self.downsample is None else self.downsample(x)
        return _conv_add_relu(self.conv3, out, skip)


class _FusedBasicBlock(BasicBlock):
    """A BasicBlock whose batch norms were folded: two fused convolutions."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        return _conv_add_relu(self.conv2, _conv_relu(self.conv1, x), skip)


def fuse_residual_blocks(network: nn.Module) -> int:
    """Run every folded ResNet block as fused convolutions; returns how many.

    Without this each folded convolution is followed by a bias kernel, a
    ReLU kernel and, at a block's end, the residual addition: about 0.3 ms
    of XMem's 3.7 ms step at 480p. (On the CPU the same maths runs unfused.)
    """
    count = 0
    for module in network.modules():
        for plain, fused in ((Bottleneck, _FusedBottleneck), (BasicBlock, _FusedBasicBlock)):
            folded = not any(isinstance(child, nn.BatchNorm2d) for child in module.children())
            if type(module) is plain and folded:
                module.__class__ = fused
                count += 1
    return count


def inference_copy(network: nn.Module, autocast_dtype: torch.dtype | None = None) -> nn.Module:
    """A copy for fast GPU inference: batch norms folded, residual blocks fused, weights channels-last.

    cuDNN's tensor-core convolutions work in NHWC; with NCHW weights each one
    converts its input and output (50 conversion kernels per XMem step at
    480p). Channels-last weights make the features NHWC from the first
    convolution on. A full copy, so the original keeps its own layout.

    For a copy that runs under autocast to `autocast_dtype`, the convolutions'
    and linear layers' weights are stored in that type: autocast would cast
    them the same way on every call (147 cast kernels per XMem step at 480p,
    about a tenth of its GPU time in bf16), and the results stay identical.
    """
    fast = copy.deepcopy(network).eval()
    fold_batch_norms(fast)
    fuse_residual_blocks(fast)
    fast = fast.to(memory_format=torch.channels_last)
    if autocast_dtype is not None:
        for module in fast.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.to(autocast_dtype)
    return fast
