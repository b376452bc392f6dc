"""XMem's sub-networks: key/value encoders, key projection, decoder and hidden-state updaters.

Naming: `f*` are image-only features, `g*` per-object features shaped
(B, objects, C, H, W); the trailing number is the stride (16, 8, 4).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cbam import CBAM
from .group_modules import (GConv2D, GroupResBlock, add_to_objects, cat_channels, downsample_objects,
                            per_object, prepend_to_objects, upsample_objects)
from .resample import upsample_bilinear
from .resnet import BasicBlock, Bottleneck, make_stage


def gated_hidden_update(gates: torch.Tensor, hidden: torch.Tensor, hidden_dim: int) -> torch.Tensor:
    """XMem's GRU-like step from 3*hidden_dim gate channels.

    Unlike a textbook GRU the candidate value does not see the reset-gated
    state, and the "forget" gate scales the kept state; the checkpoints were
    trained with this form, so it is kept exactly.
    """
    forget = torch.sigmoid(gates[:, :, :hidden_dim])
    update = torch.sigmoid(gates[:, :, hidden_dim:2 * hidden_dim])
    candidate = torch.tanh(gates[:, :, 2 * hidden_dim:])
    return forget * hidden * (1 - update) + update * candidate


class FeatureFusionBlock(nn.Module):
    """Fuses image features into each object's features: residual block, CBAM, residual block."""

    def __init__(self, x_in_dim: int, g_in_dim: int, g_mid_dim: int, g_out_dim: int):
        super().__init__()
        self.x_in_dim = x_in_dim
        self.block1 = GroupResBlock(x_in_dim + g_in_dim, g_mid_dim)
        self.attention = CBAM(g_mid_dim)
        self.block2 = GroupResBlock(g_mid_dim, g_out_dim)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        g = self.block1(prepend_to_objects(x, g))
        return self.block2(g + per_object(self.attention, g))


class HiddenUpdater(nn.Module):
    """Decoder-side sensory memory update from the multi-scale decoder features."""

    def __init__(self, g_dims: tuple[int, int, int], mid_dim: int, hidden_dim: int):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.g16_conv = GConv2D(g_dims[0], mid_dim, kernel_size=1)
        self.g8_conv = GConv2D(g_dims[1], mid_dim, kernel_size=1)
        self.g4_conv = GConv2D(g_dims[2], mid_dim, kernel_size=1)
        self.transform = GConv2D(mid_dim + hidden_dim, hidden_dim * 3, kernel_size=3, padding=1)

    def forward(self, g: list[torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
        """`g`: the decoder's g16, g8 and g4 features and its logits, which join g4's channels.

        Area downsampling works channel by channel, so the logits join g4
        after both are downsampled: the same values, without copying the
        stride-4 features into a wider tensor first.
        """
        g16, g8, g4, logits = g
        g4 = cat_channels([downsample_objects(g4, 1 / 4), downsample_objects(logits, 1 / 4)])
        fused = self.g16_conv(g16) + self.g8_conv(downsample_objects(g8, 1 / 2)) + self.g4_conv(g4)
        gates = self.transform(cat_channels([fused, hidden]))
        return gated_hidden_update(gates, hidden, self.hidden_dim)


class HiddenReinforcer(nn.Module):
    """Value-encoder-side ("deep") sensory memory update from the new memory value."""

    def __init__(self, g_dim: int, hidden_dim: int):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.transform = GConv2D(g_dim + hidden_dim, hidden_dim * 3, kernel_size=3, padding=1)

    def forward(self, g: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        gates = self.transform(cat_channels([g, hidden]))
        return gated_hidden_update(gates, hidden, self.hidden_dim)


class KeyEncoder(nn.Module):
    """ResNet-50 up to stage 3 on the image: features at strides 16, 8 and 4."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.res2 = make_stage(Bottleneck, 64, 64, 3)
        self.layer2 = make_stage(Bottleneck, 256, 128, 4, stride=2)
        self.layer3 = make_stage(Bottleneck, 512, 256, 6, stride=2)

    def stem(self, image: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(self.bn1(self.conv1(image))), kernel_size=3, stride=2, padding=1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f4 = self.res2(self.stem(image))
        f8 = self.layer2(f4)
        f16 = self.layer3(f8)
        return f16, f8, f4


class ValueEncoder(nn.Module):
    """ResNet-18 up to stage 3 on image + object mask + other objects' mask, fused with image features."""

    def __init__(self, value_dim: int, hidden_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3 + 2, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = make_stage(BasicBlock, 64, 64, 2)
        self.layer2 = make_stage(BasicBlock, 64, 128, 2, stride=2)
        self.layer3 = make_stage(BasicBlock, 128, 256, 2, stride=2)
        self.fuser = FeatureFusionBlock(1024, 256, value_dim, value_dim)
        self.hidden_reinforce = HiddenReinforcer(value_dim, hidden_dim) if hidden_dim > 0 else None

    def stem(self, g: torch.Tensor) -> torch.Tensor:
        return F.relu(F.max_pool2d(self.bn1(self.conv1(g)), kernel_size=3, stride=2, padding=1))

    def forward(self, image: torch.Tensor, image_feat_f16: torch.Tensor, hidden: torch.Tensor,
                masks: torch.Tensor, others: torch.Tensor,
                is_deep_update: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        g = prepend_to_objects(image, torch.stack([masks, others], dim=2))
        batch, objects = g.shape[:2]
        g = self.layer3(self.layer2(self.layer1(self.stem(g.flatten(0, 1)))))
        g = self.fuser(image_feat_f16, g.view(batch, objects, *g.shape[1:]))
        if is_deep_update and self.hidden_reinforce is not None:
            hidden = self.hidden_reinforce(g, hidden)
        return g, hidden


class KeyProjection(nn.Module):
    """Projects stride-16 image features to key, shrinkage (>= 1) and selection (in (0, 1))."""

    def __init__(self, in_dim: int, key_dim: int):
        super().__init__()
        self.key_proj = nn.Conv2d(in_dim, key_dim, kernel_size=3, padding=1)
        self.d_proj = nn.Conv2d(in_dim, 1, kernel_size=3, padding=1)
        self.e_proj = nn.Conv2d(in_dim, key_dim, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, need_s: bool, need_e: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        shrinkage = self.d_proj(x) ** 2 + 1 if need_s else None
        selection = torch.sigmoid(self.e_proj(x)) if need_e else None
        return self.key_proj(x), shrinkage, selection


class UpsampleBlock(nn.Module):
    """Upsamples object features and adds a projected skip connection from the key encoder."""

    def __init__(self, skip_dim: int, g_up_dim: int, g_out_dim: int, scale_factor: int = 2):
        super().__init__()
        self.skip_conv = nn.Conv2d(skip_dim, g_up_dim, kernel_size=3, padding=1)
        self.out_conv = GroupResBlock(g_up_dim, g_out_dim)
        self.scale_factor = scale_factor

    def forward(self, skip_f: torch.Tensor, up_g: torch.Tensor) -> torch.Tensor:
        g = add_to_objects(self.skip_conv(skip_f), upsample_objects(up_g, self.scale_factor))
        return self.out_conv(g)


class Decoder(nn.Module):
    """Turns the memory readout (+ hidden state) into per-object mask logits at full resolution."""

    def __init__(self, value_dim: int, hidden_dim: int):
        super().__init__()
        self.fuser = FeatureFusionBlock(1024, value_dim + hidden_dim, 512, 512)
        self.hidden_update = HiddenUpdater((512, 256, 256 + 1), 256, hidden_dim) if hidden_dim > 0 else None
        self.up_16_8 = UpsampleBlock(512, 512, 256)
        self.up_8_4 = UpsampleBlock(256, 256, 256)
        self.pred = nn.Conv2d(256, 1, kernel_size=3, padding=1)

    def forward(self, f16: torch.Tensor, f8: torch.Tensor, f4: torch.Tensor,
                hidden_state: torch.Tensor | None, memory_readout: torch.Tensor,
                h_out: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        batch, objects = memory_readout.shape[:2]
        if self.hidden_update is not None:
            memory_readout = cat_channels([memory_readout, hidden_state])
        g16 = self.fuser(f16, memory_readout)
        g8 = self.up_16_8(f8, g16)
        g4 = self.up_8_4(f4, g8)
        logits = self.pred(F.relu(g4.flatten(0, 1)))

        if h_out and self.hidden_update is not None:
            hidden_state = self.hidden_update([g16, g8, g4, logits.view(batch, objects, 1, *logits.shape[-2:])],
                                              hidden_state)
        else:
            hidden_state = None

        logits = upsample_bilinear(logits, 4)
        return hidden_state, logits.view(batch, objects, *logits.shape[-2:])
