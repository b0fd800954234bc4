"""The half-resolution refiner networks: the same CG net and denoiser design, working from 1/2 resolution.

At full resolution the networks' layers are narrow (16 channels), and on a CPU such layers are bound by
memory traffic (group norm, SiLU, adds) rather than by arithmetic. Here the inputs enter through a
pixel-unshuffle (each 2x2 block of pixels becomes one position with 4 times the channels, so no detail is
lost) and the denoiser leaves through a pixel-shuffle (each position's features give the logits of its
2x2 pixels), so every layer runs at half resolution or coarser, wider and on a quarter of the positions.
The interface is the full-resolution one of ``guidance.GuidanceNet`` and ``denoiser.Denoiser``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .guidance import GuidancePyramid
from .layers import ConvBlock, ResBlock, conv3x3, timestep_embedding, zero_conv


class HalfResGuidanceNet(GuidancePyramid):
    """(B, C, H, W) image and (B, K, H, W) coarse codes -> features at 1/2 and 1/4 resolution."""

    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, int, int, int]) -> None:
        super().__init__()
        w2, w4, w8, w16 = widths
        self.enc2 = nn.Sequential(ConvBlock(4 * (in_channels + num_classes), w2), ResBlock(w2))
        self._build_pyramid(w2, w4, w8, w16)

    def forward(self, image: torch.Tensor, coarse_codes: torch.Tensor) -> list[torch.Tensor]:
        d2, d4 = self._pyramid(self.enc2(F.pixel_unshuffle(torch.cat([image, coarse_codes], 1), 2)))
        return [d2, d4]


class HalfResDenoiser(nn.Module):
    """x_t and coarse codes (B, K, H, W), t (B,), guidance [1/2, 1/4] -> (B, K, H, W) logits of the clean map.

    As ``denoiser.Denoiser``: a correction added to the coarse code, whose last layer starts at zero, so an
    untrained refiner returns the coarse map."""

    def __init__(self, num_classes: int, widths: tuple[int, int], guidance_widths: tuple[int, int],
                 emb_dim: int = 64) -> None:
        super().__init__()
        w2, w4 = widths
        g2, g4 = guidance_widths
        self.emb_dim = emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.inp = ConvBlock(4 * 2 * num_classes, w2)
        self.coarse_scale = nn.Parameter(torch.tensor(2.0))
        self.inject2 = zero_conv(g2, w2)
        self.down4 = conv3x3(w2, w4, stride=2)
        self.inject4 = zero_conv(g4, w4)
        self.mid4 = ResBlock(w4, emb_dim)
        self.up2 = nn.Conv2d(w4, w2, 1)
        self.dec2 = ResBlock(w2, emb_dim)
        self.out = zero_conv(w2, 4 * num_classes)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, coarse_codes: torch.Tensor, guidance: list[torch.Tensor]
                ) -> torch.Tensor:
        g2, g4 = guidance
        emb = self.time_mlp(timestep_embedding(t, self.emb_dim))
        h2 = self.inp(F.pixel_unshuffle(torch.cat([x_t, coarse_codes], 1), 2)) + self.inject2(g2)
        h4 = self.mid4(self.down4(h2) + self.inject4(g4), emb)
        h2 = self.dec2(h2 + F.interpolate(self.up2(h4), size=h2.shape[-2:], mode="nearest"), emb)
        return F.pixel_shuffle(self.out(h2), 2) + self.coarse_scale * coarse_codes
