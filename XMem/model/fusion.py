"""Inference-only rewrites of a trained XMem that keep its maths: folded batch norms, fused blocks,
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

from .group_modules import GroupResBlock, per_object
from .modules import FeatureFusionBlock, KeyEncoder, KeyProjection, UpsampleBlock, ValueEncoder
from .resnet import BasicBlock, Bottleneck
from .triton_support import triton_kernels
from .winograd import WinogradConv

# The Triton kernels that fuse the passes between convolutions on CUDA.
FUSED_KERNELS = f"{__package__}.fused_kernels"


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


def _conv(conv: nn.Conv2d, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`conv`'s convolution of 4-D x with another bias (or none): `conv` may be a per-object GConv2D.

    It goes through the convolution's own `_conv_forward`, so a Winograd one (see winograd.py) stays one.
    """
    return conv._conv_forward(x, conv.weight, bias)


def _conv_of_relu(conv: nn.Conv2d, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`conv`'s convolution of relu(x) with `bias` in place of its own: a Winograd convolution takes the ReLU as
    it copies the map (see winograd.py), a pass over it fewer."""
    if isinstance(conv, WinogradConv):
        return conv.conv_of_relu(x, bias)
    return _conv(conv, F.relu(x), bias)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The type a convolution of x computes in: autocast's where it is on (it does not cast cuDNN's fused calls)."""
    return torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype


def _into(out: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """out + skip, written into `out` (a fresh result) where it holds the sum's shape and type: on the CPU a new
    feature map costs its pages' faults and zeroing as well as the pass."""
    if out.dtype == skip.dtype and out.shape == skip.shape:
        return out.add_(skip)
    return out + skip


def _conv_relu(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """relu(conv(x)) for 4-D x; on CUDA one cuDNN kernel, the bias and the activation in its epilogue."""
    if not x.is_cuda:
        return _conv(conv, x, conv.bias).relu_()
    dtype = _compute_dtype(x)
    return torch.cudnn_convolution_relu(x.to(dtype), conv.weight.to(dtype), conv.bias.to(dtype), conv.stride,
                                        conv.padding, conv.dilation, conv.groups)


def _conv_add_relu(conv: nn.Conv2d, x: torch.Tensor, skip: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """relu(conv(x) + bias + skip), `bias` in place of the convolution's own; on CUDA one cuDNN kernel."""
    if not x.is_cuda:
        return _into(_conv(conv, x, bias), skip).relu_()
    dtype = _compute_dtype(x)
    return torch.cudnn_convolution_add_relu(x.to(dtype), conv.weight.to(dtype), skip.to(dtype), 1.0, bias.to(dtype),
                                            conv.stride, conv.padding, conv.dilation, conv.groups)


def _channels_last(*tensors: torch.Tensor) -> bool:
    return all(t.is_contiguous(memory_format=torch.channels_last) for t in tensors)


def _add_per_image(out: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """out + skip (into `out`, a fresh result, where it can), where skip may hold one image for every few of
    out's (shared by that image's objects)."""
    if skip.shape[0] == out.shape[0]:
        return _into(out, skip)
    return (out.unflatten(0, (skip.shape[0], -1)) + skip.unsqueeze(1)).flatten(0, 1)


def _conv_bias_add(conv: nn.Conv2d, x: torch.Tensor, bias: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """conv(x) + bias + skip for 4-D x, `bias` in place of the convolution's own; on CUDA the sums in one pass.

    `skip` may be shared by objects, as `_add_per_image` takes it.
    """
    out = _conv(conv, x, None if x.is_cuda else bias)
    if not x.is_cuda:
        return _add_per_image(out, skip)
    kernels = triton_kernels(FUSED_KERNELS, x.device)
    if kernels is None or not _channels_last(out, skip):
        return _add_per_image(out + bias.view(-1, 1, 1), skip)
    return kernels.bias_add(out, bias, skip)


def _per_object(image: torch.Tensor, objects: int) -> torch.Tensor:
    """(B, C, H, W) image features repeated for each of `objects` objects, (B * objects, C, H, W), channels-last."""
    out = torch.empty((image.shape[0] * objects, *image.shape[1:]), dtype=image.dtype, device=image.device,
                      memory_format=torch.channels_last)
    out.view(image.shape[0], objects, *image.shape[1:]).copy_(image.unsqueeze(1))
    return out


class _FusedBottleneck(Bottleneck):
    """A Bottleneck whose batch norms were folded: three fused convolutions.

    A projected skip's bias joins the last convolution's (`out_bias`), so the
    projection runs without its own bias pass.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _conv_relu(self.conv2, _conv_relu(self.conv1, x))
        skip = x if self.downsample is None else _conv(self.downsample[0], x, None)
        return _conv_add_relu(self.conv3, out, skip, self.out_bias)


class _FusedBasicBlock(BasicBlock):
    """A BasicBlock whose batch norms were folded: two fused convolutions (skip bias as in `_FusedBottleneck`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.downsample is None else _conv(self.downsample[0], x, None)
        return _conv_add_relu(self.conv2, _conv_relu(self.conv1, x), skip, self.out_bias)


class _FusedGroupResBlock(GroupResBlock):
    """A pre-activation block: on CUDA the first convolution with its bias and ReLU in cuDNN, the second's bias,
    the skip (its projection's bias folded into `out_bias`) and the residual sum in one pass; on the CPU each
    convolution takes its input's ReLU (`_conv_of_relu`).

    `relu_g`, where the caller has it on CUDA, is relu(g) already computed.
    """

    def forward(self, g: torch.Tensor, relu_g: torch.Tensor | None = None) -> torch.Tensor:
        batch, objects = g.shape[:2]
        flat = g.flatten(0, 1)
        skip = flat if self.downsample is None else _conv(self.downsample, flat, None)
        if flat.is_cuda:
            hidden = _conv_relu(self.conv1, F.relu(flat) if relu_g is None else relu_g.flatten(0, 1))
            out = _conv_bias_add(self.conv2, hidden, self.out_bias, skip)
        else:  # both ReLUs taken by the convolutions (`_conv_of_relu`)
            hidden = _conv_of_relu(self.conv1, flat, self.conv1.bias)
            out = _add_per_image(_conv_of_relu(self.conv2, hidden, self.out_bias), skip)
        return out.view(batch, objects, *out.shape[1:])

    def forward_shared(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """forward(prepend_to_objects(x, g)) with the image features x (B, C_x, H, W) convolved once per image.

        A convolution is a sum over input channels, so over [x, g] it is one
        over x plus one over g: the image's part (two thirds of the decoder's
        first block) is the same for all of its objects. Needs the split
        convolutions `fuse_blocks` makes (`image_conv1`, `object_conv1`,
        `image_downsample`, `object_downsample`).
        """
        batch, objects = g.shape[:2]
        flat = g.flatten(0, 1)
        image_part = _per_object(_conv_of_relu(self.image_conv1, x, None), objects)
        hidden = _conv_add_relu(self.object_conv1, F.relu(flat), image_part, self.conv1.bias)
        skip = _conv_bias_add(self.object_downsample, flat, self.downsample.bias,
                              _conv(self.image_downsample, x, None))
        out = _conv_bias_add(self.conv2, hidden, self.conv2.bias, skip)
        return out.view(batch, objects, *out.shape[1:])


class _FusedFeatureFusionBlock(FeatureFusionBlock):
    """With several objects, the first block convolves the image features once (`forward_shared`)."""

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        if g.shape[1] == 1:
            return super().forward(x, g)
        g = self.block1.forward_shared(x, g)
        return self.block2(g + per_object(self.attention, g))


class _FusedUpsampleBlock(UpsampleBlock):
    """On CUDA the skip projection's bias, the x2 upsampling, their sum and its ReLU in one pass."""

    def forward(self, skip_f: torch.Tensor, up_g: torch.Tensor) -> torch.Tensor:
        kernels = triton_kernels(FUSED_KERNELS, skip_f.device)
        flat = up_g.flatten(0, 1)
        if (kernels is None or self.scale_factor != 2 or skip_f.shape[-2:] != (2 * flat.shape[-2], 2 * flat.shape[-1])
                or not _channels_last(skip_f, flat)):
            return super().forward(skip_f, up_g)
        skip = _conv(self.skip_conv, skip_f, None)
        g, relu_g = kernels.upsample_add(skip, self.skip_conv.bias, flat)
        batch, objects = up_g.shape[:2]
        return self.out_conv(g.view(batch, objects, *g.shape[1:]), relu_g.view(batch, objects, *g.shape[1:]))


class _FusedKeyProjection(KeyProjection):
    """Key, shrinkage and selection as one convolution (`joint`: their weights stacked), where all three are needed.

    Three 3x3 convolutions over the same 1024-channel features, one of them
    with a single output channel, which tensor cores run at a fraction of
    their speed.
    """

    def forward(self, x: torch.Tensor, need_s: bool, need_e: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if not (need_s and need_e):
            return super().forward(x, need_s, need_e)
        key_dim = self.key_proj.out_channels
        key, shrinkage, selection = self.joint(x).split([key_dim, 1, key_dim], dim=1)
        return key, shrinkage ** 2 + 1, torch.sigmoid(selection)


def _stem_pool(x: torch.Tensor) -> torch.Tensor:
    """ResNet's 3x3 stride-2 max pooling; on CUDA a kernel that reads channels-last features in their layout."""
    kernels = triton_kernels(FUSED_KERNELS, x.device)
    if kernels is None or not _channels_last(x):
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    return kernels.max_pool(x)


class _FusedKeyEncoder(KeyEncoder):
    def stem(self, image: torch.Tensor) -> torch.Tensor:
        return _stem_pool(_conv_relu(self.conv1, image))


class _FusedValueEncoder(ValueEncoder):
    def stem(self, g: torch.Tensor) -> torch.Tensor:
        # ReLU and max pooling commute (both keep order), so the ReLU joins the convolution.
        return _stem_pool(_conv_relu(self.conv1, g))


_FUSED = {Bottleneck: _FusedBottleneck, BasicBlock: _FusedBasicBlock, GroupResBlock: _FusedGroupResBlock,
          UpsampleBlock: _FusedUpsampleBlock, KeyEncoder: _FusedKeyEncoder, ValueEncoder: _FusedValueEncoder,
          KeyProjection: _FusedKeyProjection, FeatureFusionBlock: _FusedFeatureFusionBlock}


def _split_input(conv: nn.Conv2d, at: int) -> tuple[nn.Conv2d, nn.Conv2d]:
    """Two convolutions without bias whose sum is `conv` without its bias: over input channels [:at] and [at:]."""
    parts = []
    for weight in (conv.weight[:, :at], conv.weight[:, at:]):
        part = nn.Conv2d(weight.shape[1], conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         bias=False, device=weight.device, dtype=weight.dtype)
        part.weight.copy_(weight)
        parts.append(part)
    return parts[0], parts[1]


def _stacked(convs: list[nn.Conv2d]) -> nn.Conv2d:
    """One convolution computing each of `convs` (same input, kernel and padding) on its own output channels."""
    first = convs[0]
    joint = nn.Conv2d(first.in_channels, sum(c.out_channels for c in convs), first.kernel_size, first.stride,
                      first.padding, device=first.weight.device, dtype=first.weight.dtype)
    joint.weight.copy_(torch.cat([c.weight for c in convs]))
    joint.bias.copy_(torch.cat([c.bias for c in convs]))
    return joint


@torch.no_grad()
def fuse_blocks(network: nn.Module) -> int:
    """Run the folded network's blocks with their biases, activations and sums fused; returns how many.

    Without this each folded convolution is followed by a bias kernel, a
    ReLU kernel and, at a block's end, the residual addition: about 0.3 ms
    of XMem's 3.7 ms step at 480p; fusing the decoder's passes and joining
    the key projections took the fp32 step from 3.10 to 2.87 ms (H200). On
    the CPU the same sums run as torch operations.
    """
    count = 0
    for module in list(network.modules()):
        fused = _FUSED.get(type(module))
        if fused is None or any(isinstance(child, nn.BatchNorm2d) for child in module.children()):
            continue
        if isinstance(module, (Bottleneck, BasicBlock, GroupResBlock)):
            # The skip projection's bias joins the last convolution's.
            last = module.conv3 if isinstance(module, Bottleneck) else module.conv2
            projection = module.downsample[0] if isinstance(module.downsample, nn.Sequential) else module.downsample
            bias = last.bias if projection is None else last.bias + projection.bias
            module.register_buffer("out_bias", bias.detach().clone())
        elif isinstance(module, KeyProjection):
            module.joint = _stacked([module.key_proj, module.d_proj, module.e_proj])
        elif isinstance(module, FeatureFusionBlock):
            block = module.block1
            if block.downsample is None:
                continue  # forward_shared splits the skip projection too
            block.image_conv1, block.object_conv1 = _split_input(block.conv1, module.x_in_dim)
            block.image_downsample, block.object_downsample = _split_input(block.downsample, module.x_in_dim)
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
    fuse_blocks(fast)
    fast = fast.to(memory_format=torch.channels_last)
    if autocast_dtype is not None:
        for module in fast.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.to(autocast_dtype)
            if hasattr(module, "out_bias"):
                module.out_bias = module.out_bias.to(autocast_dtype)
    return fast
