"""Small building blocks shared by the networks."""

from __future__ import annotations

import math

import torch
from torch import nn


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation)


def zero_conv(in_ch: int, out_ch: int) -> nn.Conv2d:
    """1x1 convolution starting at zero (ControlNet-style): the guidance enters gradually during training."""
    conv = nn.Conv2d(in_ch, out_ch, 1)
    nn.init.zeros_(conv.weight)
    assert conv.bias is not None  # nn.Conv2d has a bias unless bias=False
    nn.init.zeros_(conv.bias)
    return conv


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels // 4), channels)


class ConvBlock(nn.Sequential):
    """conv3x3 -> GroupNorm -> SiLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__(conv3x3(in_ch, out_ch, stride, dilation), norm(out_ch), nn.SiLU())


class ResBlock(nn.Module):
    """Residual block; with ``emb_dim`` it is modulated by a timestep embedding (scale and shift)."""

    def __init__(self, channels: int, emb_dim: int = 0, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(channels, channels, dilation=dilation)
        self.norm1 = norm(channels)
        self.conv2 = conv3x3(channels, channels)
        self.norm2 = norm(channels)
        self.act = nn.SiLU()
        self.film = nn.Linear(emb_dim, 2 * channels) if emb_dim else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.act(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        if self.film is not None and emb is not None:
            scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        return self.act(x + h)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of continuous times t in [0, 1]: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)
