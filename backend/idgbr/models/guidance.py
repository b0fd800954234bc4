"""The conditional guidance (CG) net: reads [image, coarse map] once per tile and returns a feature pyramid.

The pyramid enters the denoiser through zero-initialised 1x1 convolutions at each scale, so the denoiser
starts as an unconditional model and learns how much to trust the image and the coarse map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConvBlock, ResBlock


class GuidanceNet(nn.Module):
    """(B, C, H, W) image and (B, K, H, W) coarse codes -> features at 1/2, 1/4 and 1/8 resolution."""

    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, int, int]) -> None:
        super().__init__()
        w2, w4, w8 = widths
        # Pixel-unshuffle keeps every full-resolution pixel while the convolutions run at half resolution.
        self.at_half = nn.Sequential(ConvBlock(4 * (in_channels + num_classes), w2), ConvBlock(w2, w2))
        self.at_quarter = nn.Sequential(ConvBlock(w2, w4, stride=2), ResBlock(w4))
        self.at_eighth = nn.Sequential(ConvBlock(w4, w8, stride=2), ResBlock(w8, dilation=2))

    def forward(self, image: torch.Tensor, coarse_codes: torch.Tensor) -> list[torch.Tensor]:
        x = F.pixel_unshuffle(torch.cat([image, coarse_codes], 1), 2)
        f2 = self.at_half(x)
        f4 = self.at_quarter(f2)
        f8 = self.at_eighth(f4)
        return [f2, f4, f8]
