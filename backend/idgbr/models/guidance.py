"""The conditional guidance (CG) net: reads [image, coarse map] once per tile and returns a feature pyramid.

A small U-Net: an encoder down to 1/16 with dilated blocks (its receptive field spans well over the largest
boundary error the refiner is trained for, 32-px blocks and 16-px displacements) and a decoder back to full
resolution with skips, so that image detail at the exact pixel is next to the output where boundaries are
decided. Its full, 1/2 and 1/4 resolution features enter the denoiser through zero-initialised
convolutions, so the denoiser learns how much to trust them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConvBlock, ResBlock


def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class GuidancePyramid(nn.Module):
    """The CG net's part from 1/2 resolution down: an encoder to 1/16 with dilated blocks and a decoder back
    to 1/2 with lateral skips. Each CG net adds its own way in (``enc2``) and, for full resolution, out."""

    def _build_pyramid(self, w2: int, w4: int, w8: int, w16: int) -> None:
        self.enc4 = nn.Sequential(ConvBlock(w2, w4, stride=2), ResBlock(w4))
        self.enc8 = nn.Sequential(ConvBlock(w4, w8, stride=2), ResBlock(w8, dilation=2))
        self.enc16 = nn.Sequential(ConvBlock(w8, w16, stride=2), ResBlock(w16, dilation=2), ResBlock(w16, dilation=4))
        self.lat16 = nn.Conv2d(w16, w8, 1)
        self.dec8 = ConvBlock(w8, w8)
        self.lat8 = nn.Conv2d(w8, w4, 1)
        self.dec4 = ConvBlock(w4, w4)
        self.lat4 = nn.Conv2d(w4, w2, 1)
        self.dec2 = ConvBlock(w2, w2)

    def _pyramid(self, e2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features at 1/2 resolution -> decoded features at 1/2 and 1/4."""
        e4 = self.enc4(e2)
        e8 = self.enc8(e4)
        e16 = self.enc16(e8)
        d8 = self.dec8(e8 + _up(self.lat16(e16), e8))
        d4 = self.dec4(e4 + _up(self.lat8(d8), e4))
        d2 = self.dec2(e2 + _up(self.lat4(d4), e2))
        return d2, d4


class GuidanceNet(GuidancePyramid):
    """(B, C, H, W) image and (B, K, H, W) coarse codes -> features at full, 1/2 and 1/4 resolution."""

    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, int, int, int, int]) -> None:
        super().__init__()
        w1, w2, w4, w8, w16 = widths
        self.enc1 = nn.Sequential(ConvBlock(in_channels + num_classes, w1), ConvBlock(w1, w1))
        self.enc2 = nn.Sequential(ConvBlock(w1, w2, stride=2), ResBlock(w2))
        self._build_pyramid(w2, w4, w8, w16)
        self.lat2 = nn.Conv2d(w2, w1, 1)
        self.dec1 = ConvBlock(w1, w1)

    def forward(self, image: torch.Tensor, coarse_codes: torch.Tensor) -> list[torch.Tensor]:
        e1 = self.enc1(torch.cat([image, coarse_codes], 1))
        d2, d4 = self._pyramid(self.enc2(e1))
        d1 = self.dec1(e1 + _up(self.lat2(d2), e1))
        return [d1, d2, d4]
