"""A second discriminative architecture: a plain fully convolutional network (FCN) with output stride 8.

No residual blocks, no decoder, no skip connections: stacked 3x3 convolutions and max-pooling, a dilated
context stage at 1/8 and logits upsampled 8x. Its maps are blobbier than the encoder-decoder's, with
different errors, which is what validating the refiner on "other models' maps" needs. It is a complete
coarse model: `idgbr train coarse --architecture fcn` trains it and every command can use it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConvBlock

FCN_KIND = "fcn"


@dataclass
class FcnConfig:
    in_channels: int = 3
    num_classes: int = 5
    widths: tuple[int, int, int] = (24, 64, 112)
    kind: str = FCN_KIND

    def to_dict(self) -> dict:
        return asdict(self)


class FcnNet(nn.Module):
    """(B, C, H, W) normalised image -> (B, K, H, W) class logits; H, W multiples of 8."""

    def __init__(self, config: FcnConfig) -> None:
        super().__init__()
        w2, w4, w8 = config.widths
        self.config = config
        self.features = nn.Sequential(
            ConvBlock(config.in_channels, w2), ConvBlock(w2, w2), nn.MaxPool2d(2),
            ConvBlock(w2, w4), ConvBlock(w4, w4), nn.MaxPool2d(2),
            ConvBlock(w4, w8), ConvBlock(w8, w8), nn.MaxPool2d(2),
            ConvBlock(w8, w8, dilation=2), ConvBlock(w8, w8, dilation=4),
        )
        self.head = nn.Conv2d(w8, config.num_classes, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.head(self.features(image)), scale_factor=8.0, mode="bilinear")
