"""The discriminative coarse segmenter: a compact encoder-decoder with output stride 4.

Like most discriminative segmenters it predicts at reduced resolution and upsamples its logits, so it is
good at *what* is where and loose at the exact boundary; the refiner repairs the boundary.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConvBlock, ResBlock


@dataclass
class CoarseConfig:
    in_channels: int = 3
    num_classes: int = 5
    widths: tuple[int, int, int, int] = (24, 32, 64, 128)

    def to_dict(self) -> dict:
        return asdict(self)


class CoarseNet(nn.Module):
    """(B, C, H, W) normalised image -> (B, K, H, W) class logits; H, W multiples of 16."""

    def __init__(self, config: CoarseConfig) -> None:
        super().__init__()
        w0, w1, w2, w3 = config.widths
        self.config = config
        self.stem = nn.Sequential(ConvBlock(config.in_channels, w0, stride=2), ConvBlock(w0, w1, stride=2))
        self.stage4 = ResBlock(w1)
        self.stage8 = nn.Sequential(ConvBlock(w1, w2, stride=2), ResBlock(w2))
        self.stage16 = nn.Sequential(ConvBlock(w2, w3, stride=2), ResBlock(w3, dilation=2), ResBlock(w3, dilation=4))
        self.lateral8 = nn.Conv2d(w2, w2, 1)
        self.fuse8 = ConvBlock(w3 + w2, w2)
        self.fuse4 = ConvBlock(w2 + w1, w1)
        self.head = nn.Conv2d(w1, config.num_classes, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        f4 = self.stage4(self.stem(image))
        f8 = self.stage8(f4)
        f16 = self.stage16(f8)
        x = self.fuse8(torch.cat([F.interpolate(f16, scale_factor=2.0, mode="bilinear"), self.lateral8(f8)], 1))
        x = self.fuse4(torch.cat([F.interpolate(x, scale_factor=2.0, mode="bilinear"), f4], 1))
        return F.interpolate(self.head(x), scale_factor=4.0, mode="bilinear")
