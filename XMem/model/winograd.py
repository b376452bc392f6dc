"""3x3 convolutions as Winograd F(4x4, 3x3) on the CPU: a quarter of the multiplications.

A stride-1 3x3 convolution makes each 4x4 block of outputs from a 6x6 tile
of the input. Winograd's minimal filtering (Lavin & Gray, "Fast Algorithms
for Convolutional Neural Networks", 2016) writes it as
Y = A^T [(G w G^T) * (B^T d B)] A: the weights and the tile are taken to a
6x6 transform domain, multiplied element by element, and taken back.
Summed over input channels, the 36 element-wise products become 36 matrix
products of (tiles x C) by (C x K): 36 multiply-adds per tile and channel
pair where the direct convolution needs 144.

On a 2-core CPU XMem's fp32 step is almost all such convolutions (its
decoder's 256- to 1,600-channel blocks), and oneDNN's direct convolution
already runs them near the cores' peak, so doing fewer multiplications is
what is left. The sums are the same, only their rounding differs (about 1e-5
relative in fp32 against 1e-6 for the direct convolution: the transforms
scale some terms by up to 8 and 25). The weights' transform is exact maths
done once, in float64.
"""
from __future__ import annotations

import contextlib
import functools
import math
import threading
from typing import Iterator

import torch
from torch import nn

TILE = 4  # outputs per tile side: F(4x4, 3x3) reads 6x6 input tiles

# Interpolation points 0, 1, -1, 2, -2 and infinity.
_INPUT_T = torch.tensor([[4, 0, -5, 0, 1, 0],
                         [0, -4, -4, 1, 1, 0],
                         [0, 4, -4, -1, 1, 0],
                         [0, -2, -1, 2, 1, 0],
                         [0, 2, -1, -2, 1, 0],
                         [0, 4, 0, -5, 0, 1]], dtype=torch.float64)  # B^T
_WEIGHT_T = torch.tensor([[1 / 4, 0, 0],
                          [-1 / 6, -1 / 6, -1 / 6],
                          [-1 / 6, 1 / 6, -1 / 6],
                          [1 / 24, 1 / 12, 1 / 6],
                          [1 / 24, -1 / 12, 1 / 6],
                          [0, 0, 1]], dtype=torch.float64)  # G
_OUTPUT_T = torch.tensor([[1, 1, 1, 1, 1, 0],
                          [0, 1, -1, 2, -2, 0],
                          [0, 1, 1, 4, 4, 0],
                          [0, 1, -1, 8, -8, 1]], dtype=torch.float64)  # A^T
_SIDE = TILE + 2


@functools.lru_cache(maxsize=8)
def _transforms(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The 2-D input and output transforms as matrices over flattened tiles: (36, 36) and (16, 36)."""
    return torch.kron(_INPUT_T, _INPUT_T).to(dtype), torch.kron(_OUTPUT_T, _OUTPUT_T).to(dtype)


def transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """(K, C, 3, 3) weights -> (36, C, K) in the transform domain, computed in float64, stored in weight's type."""
    out_channels, in_channels = weight.shape[:2]
    # G w G^T for every kernel at once, as (G (x) G) times the kernels flattened along the rows: the product comes
    # out in the (36, C, K) layout itself (an einsum of the three took 4.2 s for XMem's, against 1.5).
    kernels = weight.detach().cpu().permute(2, 3, 1, 0).reshape(9, in_channels * out_channels).double()
    transformed = torch.mm(torch.kron(_WEIGHT_T, _WEIGHT_T), kernels)
    return transformed.view(_SIDE * _SIDE, in_channels, out_channels).to(weight.dtype)


class _Workspace:
    """Flat buffers that a convolution's intermediates are views of, kept between calls.

    The intermediates are a few times the size of the feature map (tens of MB at XMem's stride 4 and
    480p); allocated afresh on every call, each page is faulted in and zeroed by the kernel again: the
    480p step took 838 ms that way against 710 ms with these, on 2 cores.
    """

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}

    def take(self, slot: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = math.prod(shape)
        key = (slot, like.dtype, like.device)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            with torch.inference_mode(False):  # an inference tensor could not be written outside inference mode
                buffer = self.buffers[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buffer[:numel].view(shape)


_idle_workspaces: list[_Workspace] = []  # one per convolution running at once, at most
_workspaces_lock = threading.Lock()


@contextlib.contextmanager
def _workspace() -> Iterator[_Workspace]:
    with _workspaces_lock:
        workspace = _idle_workspaces.pop() if _idle_workspaces else _Workspace()
    try:
        yield workspace
    finally:
        with _workspaces_lock:
            _idle_workspaces.append(workspace)


def winograd_conv3x3(x: torch.Tensor, transformed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.conv2d(x, weight, bias, padding=1)` for (N, C, H, W) x, given `transform_weight(weight)`.

    The result is channels-last: the tiles are gathered along contiguous
    channels, and XMem's features are channels-last already.
    """
    batch, channels, height, width = x.shape
    out_channels = transformed.shape[2]
    tiles_h, tiles_w = -(-height // TILE), -(-width // TILE)
    tiles = batch * tiles_h * tiles_w
    input_t, output_t = _transforms(x.dtype)
    with _workspace() as workspace:
        # Zero padding around the map (and up to whole tiles): only the border is written besides the map.
        padded = workspace.take("padded", (batch, TILE * tiles_h + 2, TILE * tiles_w + 2, channels), x)
        padded[:, 0].zero_()
        padded[:, height + 1:].zero_()
        padded[:, :, 0].zero_()
        padded[:, :, width + 1:].zero_()
        padded[:, 1:height + 1, 1:width + 1].copy_(x.permute(0, 2, 3, 1))
        patches = padded.unfold(1, _SIDE, TILE).unfold(2, _SIDE, TILE)  # N th tw C 6 6
        # Slot "a" holds the gathered tiles, then the products; "b" the transformed tiles, then the blocks.
        gathered = workspace.take("a", (_SIDE, _SIDE, batch, tiles_h, tiles_w, channels), x)
        gathered.copy_(patches.permute(4, 5, 0, 1, 2, 3))
        spread = torch.mm(input_t, gathered.view(_SIDE * _SIDE, -1),
                          out=workspace.take("b", (_SIDE * _SIDE, tiles * channels), x))
        products = torch.bmm(spread.view(-1, tiles, channels), transformed,
                             out=workspace.take("a", (_SIDE * _SIDE, tiles, out_channels), x))
        blocks = torch.mm(output_t, products.view(_SIDE * _SIDE, -1),
                          out=workspace.take("b", (TILE * TILE, tiles * out_channels), x))
        out = torch.empty((batch, TILE * tiles_h, TILE * tiles_w, out_channels), dtype=x.dtype, device=x.device)
        arranged = blocks.view(TILE, TILE, batch, tiles_h, tiles_w, out_channels).permute(2, 3, 0, 4, 1, 5)
        tiled = out.view(batch, tiles_h, TILE, tiles_w, TILE, out_channels)
        if bias is None:
            tiled.copy_(arranged)
        else:  # the bias joins the copy into place
            torch.add(arranged, bias, out=tiled)
    out = out[:, :height, :width].permute(0, 3, 1, 2)
    return out if out.is_contiguous(memory_format=torch.channels_last) else out.contiguous(
        memory_format=torch.channels_last)


class _WinogradConv:
    """Mixed into a Conv2d (or a subclass such as XMem's GConv2D): its own weights run as Winograd on the CPU.

    Anything else (another device, weight or type, autograd) takes the convolution's own path. The transformed
    weights are four times the size of the convolution's, so only a network meant to run on the CPU in fp32
    should be given them (`use_winograd`).
    """

    winograd_weight: torch.Tensor

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if (weight is self.weight and x.device.type == "cpu" and x.dtype == weight.dtype
                and not torch.is_grad_enabled()):
            return winograd_conv3x3(x, self.winograd_weight, bias)
        return super()._conv_forward(x, weight, bias)


@functools.cache
def _winograd_class(cls: type) -> type:
    return type(f"Winograd{cls.__name__}", (_WinogradConv, cls), {})


def suits_winograd(conv: nn.Conv2d, min_channels: int) -> bool:
    """A 3x3, stride-1, padding-1, ungrouped convolution wide enough for the transforms to pay."""
    return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and conv.out_channels > 1 and conv.in_channels >= min_channels)


def use_winograd(network: nn.Module, min_channels: int) -> int:
    """Run, in place, every convolution that `suits_winograd` as Winograd on the CPU; returns how many.

    The weights are transformed here (1.5 s for XMem's on 2 cores), not on a video's first frame.
    """
    count = 0
    for module in network.modules():
        if isinstance(module, nn.Conv2d) and not isinstance(module, _WinogradConv) \
                and suits_winograd(module, min_channels):
            module.winograd_weight = transform_weight(module.weight)
            module.__class__ = _winograd_class(type(module))
            count += 1
    return count
