"""YUV 4:2:0 <-> RGB on the compute device, the conversions swscale does on the CPU.

On a GPU the tracker moves decoded YUV planes up and encoder-ready YUV planes
down (half the bytes of RGB each way) and converts them there, so that the
CPU threads only decode and encode. The maths is the standard one (BT.601 /
BT.709 matrices, limited or full range, chroma interpolated between samples
sited where the video says, as swscale does); results agree with swscale's
fixed-point conversions within a grey level.
"""
from __future__ import annotations

from functools import lru_cache
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F

from XMem.model.triton_support import triton_kernels

from .video import YuvPicture

# Luma weights (Kr, Kb) of the two matrices in use for 8-bit video.
MATRICES = {"bt601": (0.299, 0.114), "bt709": (0.2126, 0.0722)}


def colour_on_device(device: torch.device) -> bool:
    """Whether frames travel as YUV planes and are converted on the compute device (a GPU), not by swscale."""
    return device.type == "cuda"


def pixel_kernels(device: torch.device) -> ModuleType | None:
    """`tracker.colour_kernels` where its Triton kernels run on `device` (CUDA), else None (torch operations)."""
    return triton_kernels(f"{__package__}.colour_kernels", device)


def _rgb_from_yuv_matrix(matrix: str) -> tuple[tuple[float, float, float], ...]:
    """Rows of R, G, B in terms of (Y', Pb, Pr) with Y' in [0, 1] and Pb, Pr in [-0.5, 0.5]."""
    kr, kb = MATRICES[matrix]
    kg = 1.0 - kr - kb
    return ((1.0, 0.0, 2 * (1 - kr)),
            (1.0, -2 * kb * (1 - kb) / kg, -2 * kr * (1 - kr) / kg),
            (1.0, 2 * (1 - kb), 0.0))


def _scales(full_range: bool) -> tuple[float, float, float]:
    """(luma offset, luma span, chroma span) of 8-bit codes."""
    return (0.0, 255.0, 255.0) if full_range else (16.0, 219.0, 224.0)


def packed_yuv420(planes: np.ndarray | torch.Tensor, matrix: str = "bt709", full_range: bool = False,
                  interlaced: bool = False) -> YuvPicture:
    """A picture around packed (H * 3 / 2, W) yuv420p planes."""
    return YuvPicture(planes, planes.shape[1], planes.shape[0] * 2 // 3, matrix, full_range, interlaced=interlaced)


def split_planes(planes: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Y, U and V planes of a packed yuv420p array (even height and width)."""
    flat = planes.reshape(-1)
    luma = height * width
    chroma = luma // 4
    return (flat[:luma].view(height, width),
            flat[luma:luma + chroma].view(height // 2, width // 2),
            flat[luma + chroma:luma + 2 * chroma].view(height // 2, width // 2))


def yuv420_to_rgb(picture: YuvPicture) -> torch.Tensor:
    """The picture as HxWx3 uint8 RGB in display orientation, on the device its planes are on."""
    planes = torch.as_tensor(picture.planes)
    offset, luma_span, chroma_span = _scales(picture.full_range)
    rows = _rgb_from_yuv_matrix(picture.matrix)
    kernels = pixel_kernels(planes.device)
    across, down = _siting_weights(picture)
    if kernels is not None:
        rgb = kernels.yuv420_to_rgb(planes, picture.height, picture.width, rows, offset, luma_span, chroma_span,
                                    across[0], down)
    else:
        y, u, v = split_planes(planes, picture.height, picture.width)
        y = (y.float() - offset) / luma_span
        pb = (_upsampled(u.float(), across, down) - 128) / chroma_span
        pr = (_upsampled(v.float(), across, down) - 128) / chroma_span
        rgb = torch.stack([y * a + pb * b + pr * c for a, b, c in rows], dim=-1)
        rgb = rgb.mul_(255).round_().clamp_(0, 255).to(torch.uint8)
    turns = picture.rotation // 90 % 4
    return torch.rot90(rgb, k=-turns, dims=(0, 1)).contiguous() if turns else rgb


Weights = tuple[tuple[float, float], ...]  # per field: a pixel's weight for its own chroma sample, even / odd line

# Samples between pixel pairs are 1/4 pixel from each; samples on the even pixels are the even ones' own and
# halfway from the odd ones. In an interlaced picture each field has its own chroma rows, a quarter of a
# field line below its lines in the top field and three quarters in the bottom one (MPEG-2's siting).
_BETWEEN, _ON_EVEN, _FIELDS = ((0.75, 0.75),), ((1.0, 0.5),), ((0.875, 0.625), (0.625, 0.875))


def _siting_weights(picture: YuvPicture) -> tuple[Weights, Weights]:
    """(along the rows, down the columns): how much of its own chroma sample a pixel takes, the rest coming
    from the nearest other sample (see `_neighbours`), as swscale weighs them."""
    across = _ON_EVEN if picture.cosited[0] else _BETWEEN
    down = _FIELDS if picture.interlaced else _ON_EVEN if picture.cosited[1] else _BETWEEN
    return across, down


def _upsampled(chroma: torch.Tensor, across: Weights, down: Weights) -> torch.Tensor:
    """Chroma codes at each pixel, bilinear between samples (edges repeated) with `_siting_weights`:
    swscale's interpolation. Repeating a sample over its 2x2 block, as this did, left colour edges in
    steps of two pixels. The weights are multiples of 1/8 and the codes whole numbers, so every step is
    exact and the order of the sums does not matter."""
    height, width = chroma.shape
    near_rows, far_rows, row_weights = _neighbours(height, down, chroma.device)
    near_cols, far_cols, col_weights = _neighbours(width, across, chroma.device)
    near, far = chroma[near_rows], chroma[far_rows]
    row_weights = row_weights[:, None]
    return row_weights * (col_weights * near[:, near_cols] + (1 - col_weights) * near[:, far_cols]) + \
        (1 - row_weights) * (col_weights * far[:, near_cols] + (1 - col_weights) * far[:, far_cols])


def _neighbours(samples: int, weights: Weights, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each of the 2 * `samples` pixels along a side: its own chroma sample, the nearest other one of its
    field (before it at even lines, after it at odd ones) and the weight of its own."""
    fields = len(weights)
    pixel = torch.arange(2 * samples, device=device)
    field, line = pixel % fields, pixel // fields
    near, odd = line // 2, line % 2
    top, bottom = weights[0], weights[-1]  # Python numbers, not a tensor copied in: a CUDA graph holds this
    own = torch.where(odd == 1, torch.where(field == 1, bottom[1], top[1]), torch.where(field == 1, bottom[0], top[0]))
    far = (near + odd * 2 - 1).clamp_(0, samples // fields - 1)
    return near * fields + field, far * fields + field, own


def _by_fields(image: torch.Tensor, matrix: str, full_range: bool) -> YuvPicture:
    """`rgb_to_yuv420` of each field (every other row), the planes' rows woven back together: each field's
    chroma from its own rows."""
    height = image.shape[0]
    fields = [rgb_to_yuv420(image[first::2], matrix, full_range) for first in (0, 1)]
    width = fields[0].width
    planes = [split_planes(field.planes, height // 2, width) for field in fields]
    woven = [torch.stack(pair, dim=1).reshape(-1) for pair in zip(*planes)]  # Y, U, V: a row of each field in turn
    return packed_yuv420(torch.cat(woven).view(-1, width), matrix, full_range, interlaced=True)


@lru_cache(maxsize=8)
def _encoding_constants(device: torch.device, matrix: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Luma weights, the chroma row filter and the chroma scales, made on the device once: a tensor made
    from Python numbers on a GPU is a copy that waits for all queued work, which stalled every frame."""
    kr, kb = MATRICES[matrix]
    return (torch.tensor([[kr, 1.0 - kr - kb, kb]], device=device),
            torch.tensor([1.0, 3.0, 3.0, 1.0], device=device).view(1, 1, 4, 1) / 8,
            torch.tensor([[2 * (1 - kb)], [2 * (1 - kr)]], device=device))


def rgb_to_yuv420(image: torch.Tensor, matrix: str = "bt709", full_range: bool = False,
                  interlaced: bool = False) -> YuvPicture:
    """HxWx3 uint8 RGB -> a YuvPicture on the same device, odd sides padded with a copy of the last row/column.

    Chroma is subsampled as swscale does it (the mean of each horizontal pair,
    then a [1, 3, 3, 1] / 8 filter down the rows), so GPU-converted frames
    encode like CPU-converted ones. An `interlaced` picture (H a multiple of
    4) is converted field by field, as the writer converts one on the CPU.
    """
    if interlaced:
        return _by_fields(image, matrix, full_range)
    offset, luma_span, chroma_span = _scales(full_range)
    kernels = pixel_kernels(image.device)
    if kernels is not None:
        kr, kb = MATRICES[matrix]
        return packed_yuv420(kernels.rgb_to_yuv420(image, kr, kb, offset, luma_span, chroma_span), matrix, full_range)
    height, width = image.shape[:2]
    rgb = image.permute(2, 0, 1).unsqueeze(0).float() / 255
    if height % 2 or width % 2:
        rgb = F.pad(rgb, (0, width % 2, 0, height % 2), mode="replicate")
    coded_h, coded_w = rgb.shape[-2:]
    weights, rows, chroma_scale = _encoding_constants(rgb.device, matrix)
    luma = torch.einsum("kc,bchw->bkhw", weights, rgb)
    pairs = F.avg_pool2d(torch.cat([rgb[:, 2:3] - luma, rgb[:, 0:1] - luma], 1), (1, 2))
    chroma = F.conv2d(F.pad(pairs, (0, 0, 1, 1), mode="replicate").view(2, 1, coded_h + 2, coded_w // 2),
                      rows, stride=(2, 1))
    chroma = chroma.view(2, -1) / chroma_scale

    def code(values: torch.Tensor, span: float, base: float) -> torch.Tensor:
        return (values * span + base).round_().clamp_(0, 255).to(torch.uint8).reshape(-1)

    planes = torch.cat([code(luma, luma_span, offset), code(chroma, chroma_span, 128)])
    return packed_yuv420(planes.view(-1, coded_w), matrix, full_range)
