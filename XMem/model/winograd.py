"""3x3 convolutions as Winograd F(4x4, 3x3) or F(6x6, 3x3) on the CPU: a quarter of the multiplications or less.

A stride-1 3x3 convolution makes each 4x4 block of outputs from a 6x6 tile
of the input. Winograd's minimal filtering (Lavin & Gray, "Fast Algorithms
for Convolutional Neural Networks", 2016) writes it as
Y = A^T [(G w G^T) * (B^T d B)] A: the weights and the tile are taken to a
6x6 transform domain, multiplied element by element, and taken back.
Summed over input channels, the 36 element-wise products become 36 matrix
products of (tiles x C) by (C x K): 36 multiply-adds per tile and channel
pair where the direct convolution needs 144. F(6x6, 3x3) makes 6x6 blocks
from 8x8 tiles with 64 (against 324), but its transforms cost more and a map
makes fewer tiles, so each transformed weight, read once a call, serves fewer
rows of its product: it pays on XMem's finer maps only (at 240p on 2 cores,
1/8 and 1/4 of the image: 1.6 -> 1.4 ms for a 128-channel convolution at
30x54, 14.4 -> 12.8 ms for a 256-channel one at 60x108; but at 15x27,
3.4 -> 6.3 ms for 512 channels).

On a 2-core CPU XMem's fp32 step is almost all such convolutions (its
decoder's 256- to 1,600-channel blocks), and oneDNN's direct convolution
already runs them near the cores' peak, so doing fewer multiplications is
what is left. The sums are the same, only their rounding differs (in fp32
about 3e-6 relative for F(4x4, 3x3) and 6e-6 for F(6x6, 3x3), against 1e-6
for the direct convolution: the 2-D transforms' entries reach 25 and 64 for
F(4x4, 3x3), 27.6 and 1,024 for F(6x6, 3x3)). The transforms are exact maths:
their matrices are made in rationals (Toom-Cook), the weights' transform
once, in float64.
"""
from __future__ import annotations

import contextlib
import functools
import math
import threading
from fractions import Fraction
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

# Output tile sides and their interpolation points (besides infinity): F(4x4, 3x3) reads 6x6 input tiles and
# F(6x6, 3x3) 8x8 ones, with 36 and 64 multiplications per tile and channel pair for 16 and 36 outputs.
_POINTS = {4: (0, 1, -1, 2, -2), 6: (0, 1, -1, 2, -2, Fraction(1, 2), Fraction(-1, 2))}


def _times(a: list[Fraction], b: list[Fraction]) -> list[Fraction]:
    """The product of two polynomials given by their coefficients, lowest power first."""
    out = [Fraction(0)] * (len(a) + len(b) - 1)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            out[i + j] += x * y
    return out


@functools.cache
def winograd_matrices(tile: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """B^T, G and A^T of F(tile, 3) by Toom-Cook, exact in rationals, returned in float64.

    For each finite point p: B^T's row is the coefficients of the product of (x - q) over the other points,
    G's row (1, p, p^2) over that product's value at p, A^T's column (1, p, ..., p^(tile-1)); infinity adds
    the product over all points to B^T and the last unit vectors to G and A^T.
    """
    points = [Fraction(p) for p in _POINTS[tile]]
    side = tile + 2
    input_t, weight_t = [], []
    output_t = [[Fraction(0)] * side for _ in range(tile)]
    for j, p in enumerate(points):
        others = [q for q in points if q != p]
        numerator = functools.reduce(_times, ([-q, Fraction(1)] for q in others), [Fraction(1)])
        scale = math.prod(p - q for q in others)
        input_t.append(numerator + [Fraction(0)])
        weight_t.append([p ** k / scale for k in range(3)])
        for i in range(tile):
            output_t[i][j] = p ** i
    input_t.append(functools.reduce(_times, ([-q, Fraction(1)] for q in points), [Fraction(1)]))
    weight_t.append([Fraction(0), Fraction(0), Fraction(1)])
    output_t[-1][-1] = Fraction(1)
    return tuple(torch.tensor([[float(v) for v in row] for row in m], dtype=torch.float64)
                 for m in (input_t, weight_t, output_t))


@functools.lru_cache(maxsize=8)
def _transforms(tile: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The 2-D input and output transforms as matrices over flattened tiles: (side^2, side^2) and (tile^2, side^2)."""
    input_t, _, output_t = winograd_matrices(tile)
    return torch.kron(input_t, input_t).to(dtype), torch.kron(output_t, output_t).to(dtype)


def transform_weight(weight: torch.Tensor, tile: int = 4) -> torch.Tensor:
    """(K, C, 3, 3) weights -> (side^2, C, K) for F(tile x tile, 3x3), computed in float64, stored in weight's type."""
    out_channels, in_channels = weight.shape[:2]
    # G w G^T for every kernel at once, as (G (x) G) times the kernels flattened along the rows: the product comes
    # out in the (side^2, C, K) layout itself (an einsum of the three took 4.2 s for XMem's, against 1.5).
    kernels = weight.detach().cpu().permute(2, 3, 1, 0).reshape(9, in_channels * out_channels).double()
    weight_t = winograd_matrices(tile)[1]
    transformed = torch.mm(torch.kron(weight_t, weight_t), kernels)
    return transformed.view((tile + 2) ** 2, in_channels, out_channels).to(weight.dtype)


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


def winograd_conv3x3(x: torch.Tensor, transformed: torch.Tensor, bias: torch.Tensor | None = None,
                     relu_input: bool = False) -> torch.Tensor:
    """`F.conv2d(x, weight, bias, padding=1)` for (N, C, H, W) x, given `transform_weight(weight, tile)`.

    With `relu_input`, of relu(x): taken as the map is copied into the padded one, a pass over it fewer than
    a ReLU of its own. The result is channels-last: the tiles are gathered along contiguous channels, and
    XMem's features are channels-last already.
    """
    batch, channels, height, width = x.shape
    side = math.isqrt(transformed.shape[0])
    tile, out_channels = side - 2, transformed.shape[2]
    tiles_h, tiles_w = -(-height // tile), -(-width // tile)
    tiles = batch * tiles_h * tiles_w
    input_t, output_t = _transforms(tile, x.dtype)
    with _workspace() as workspace:
        # Zero padding around the map (and up to whole tiles): only the border is written besides the map.
        padded = workspace.take("padded", (batch, tile * tiles_h + 2, tile * tiles_w + 2, channels), x)
        padded[:, 0].zero_()
        padded[:, height + 1:].zero_()
        padded[:, :, 0].zero_()
        padded[:, :, width + 1:].zero_()
        inside = padded[:, 1:height + 1, 1:width + 1]
        if relu_input:
            torch.clamp_min(x.permute(0, 2, 3, 1), 0, out=inside)
        else:
            inside.copy_(x.permute(0, 2, 3, 1))
        patches = padded.unfold(1, side, tile).unfold(2, side, tile)  # N th tw C side side
        # Slot "a" holds the gathered tiles, then the products; "b" the transformed tiles, then the blocks.
        gathered = workspace.take("a", (side, side, batch, tiles_h, tiles_w, channels), x)
        gathered.copy_(patches.permute(4, 5, 0, 1, 2, 3))
        spread = torch.mm(input_t, gathered.view(side * side, -1),
                          out=workspace.take("b", (side * side, tiles * channels), x))
        products = torch.bmm(spread.view(-1, tiles, channels), transformed,
                             out=workspace.take("a", (side * side, tiles, out_channels), x))
        blocks = torch.mm(output_t, products.view(side * side, -1),
                          out=workspace.take("b", (tile * tile, tiles * out_channels), x))
        out = torch.empty((batch, tile * tiles_h, tile * tiles_w, out_channels), dtype=x.dtype, device=x.device)
        arranged = blocks.view(tile, tile, batch, tiles_h, tiles_w, out_channels).permute(2, 3, 0, 4, 1, 5)
        tiled = out.view(batch, tiles_h, tile, tiles_w, tile, out_channels)
        if bias is None:
            tiled.copy_(arranged)
        else:  # the bias joins the copy into place
            torch.add(arranged, bias, out=tiled)
    out = out[:, :height, :width].permute(0, 3, 1, 2)
    return out if out.is_contiguous(memory_format=torch.channels_last) else out.contiguous(
        memory_format=torch.channels_last)


class WinogradConv:
    """Mixed into a Conv2d (or a subclass such as XMem's GConv2D): its own weights run as Winograd on the CPU.

    Anything else (another device, weight or type, autograd) takes the convolution's own path. The transformed
    weights are four (F(4x4, 3x3)) or seven (F(6x6, 3x3)) times the size of the convolution's, so only a
    network meant to run on the CPU in fp32 should be given them (`use_winograd`).
    """

    winograd_weight: torch.Tensor

    def _runs_winograd(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        return (weight is self.weight and x.device.type == "cpu" and x.dtype == weight.dtype
                and not torch.is_grad_enabled())

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self._runs_winograd(x, weight):
            return winograd_conv3x3(x, self.winograd_weight, bias)
        return super()._conv_forward(x, weight, bias)

    def conv_of_relu(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The convolution of relu(x), with `bias` in place of its own."""
        if self._runs_winograd(x, self.weight):
            return winograd_conv3x3(x, self.winograd_weight, bias, relu_input=True)
        return super()._conv_forward(F.relu(x), self.weight, bias)


@functools.cache
def _winograd_class(cls: type) -> type:
    return type(f"Winograd{cls.__name__}", (WinogradConv, cls), {})


def suits_winograd(conv: nn.Conv2d, min_channels: int) -> bool:
    """A 3x3, stride-1, padding-1, ungrouped convolution wide enough for the transforms to pay."""
    return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and conv.out_channels > 1 and conv.in_channels >= min_channels)


def use_winograd(network: nn.Module, min_channels: int, large_tile_modules: tuple[str, ...] = ()) -> int:
    """Run, in place, every convolution that `suits_winograd` as Winograd on the CPU; returns how many.

    Those within `large_tile_modules` (names of submodules) run as F(6x6, 3x3), the others as F(4x4, 3x3):
    the larger tile needs fewer multiplications per output but makes fewer, longer tiles of a map, so it
    pays only on large maps (see `XMem.model.network.FINE_MODULES`). The weights are transformed here
    (1.5 s for XMem's on 2 cores), not on a video's first frame.
    """
    count = 0
    for name, module in network.named_modules():
        if isinstance(module, nn.Conv2d) and not isinstance(module, WinogradConv) \
                and suits_winograd(module, min_channels):
            large = any(name.startswith(prefix + ".") for prefix in large_tile_modules)
            module.winograd_weight = transform_weight(module.weight, 6 if large else 4)
            module.__class__ = _winograd_class(type(module))
            count += 1
    return count
