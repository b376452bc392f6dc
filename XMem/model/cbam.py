"""CBAM attention (Woo et al., 2018): channel gate then spatial gate.

Submodule names (`ChannelGate.mlp.1`, `SpatialGate.spatial.conv`) follow the
official XMem checkpoints.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class ChannelGate(nn.Module):
    """Reweights channels from a shared MLP over global average- and max-pooled features."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels, channels // reduction),
            nn.ReLU(),
            nn.Linear(channels // reduction, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled_avg = x.mean(dim=(2, 3), keepdim=True)
        pooled_max = x.amax(dim=(2, 3), keepdim=True)
        attention = self.mlp(pooled_avg) + self.mlp(pooled_max)
        return x * torch.sigmoid(attention)[:, :, None, None]


class SpatialGate(nn.Module):
    """Reweights pixels from a 7x7 convolution over the channel-wise max and mean."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.spatial = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(2, 1, kernel_size, padding=(kernel_size - 1) // 2),
        ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        summary = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(summary))


class CBAM(nn.Module):
    """Channel attention followed by spatial attention."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.ChannelGate = ChannelGate(channels, reduction)
        self.SpatialGate = SpatialGate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.SpatialGate(self.ChannelGate(x))
