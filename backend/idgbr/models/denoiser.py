"""The conditional denoiser: predicts the clean class map (as logits) from a noisy mask code.

A small U-Net at full, 1/2 and 1/4 resolution, modulated by the timestep embedding, that receives the CG
pyramid at each of those scales through zero-initialised convolutions. Its output is a correction added
to the coarse map's code (a learned scale, the correction's last layer starts at zero), so an untrained
refiner returns the coarse map and training learns where to depart from it. It runs once per sampler
step, so it is kept lighter than the CG net, which runs once per tile.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConvBlock, ResBlock, conv3x3, timestep_embedding, zero_conv


class Denoiser(nn.Module):
    """x_t and coarse codes (B, K, H, W), t (B,), guidance pyramid -> (B, K, H, W) logits of the clean map."""

    def __init__(self, num_classes: int, widths: tuple[int, int, int], guidance_widths: tuple[int, int, int],
                 emb_dim: int = 64) -> None:
        super().__init__()
        w1, w2, w4 = widths
        g1, g2, g4 = guidance_widths
        self.emb_dim = emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.inp = ConvBlock(2 * num_classes, w1)
        self.coarse_scale = nn.Parameter(torch.tensor(2.0))
        self.inject1 = zero_conv(g1, w1)
        self.down2 = conv3x3(w1, w2, stride=2)
        self.inject2 = zero_conv(g2, w2)
        self.enc2 = ResBlock(w2, emb_dim)
        self.down4 = conv3x3(w2, w4, stride=2)
        self.inject4 = zero_conv(g4, w4)
        self.mid4 = ResBlock(w4, emb_dim)
        self.up2 = nn.Conv2d(w4, w2, 1)
        self.dec2 = ResBlock(w2, emb_dim)
        self.up1 = nn.Conv2d(w2, w1, 1)
        self.dec1 = ConvBlock(w1, w1)
        self.out = zero_conv(w1, num_classes)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, coarse_codes: torch.Tensor, guidance: list[torch.Tensor]
                ) -> torch.Tensor:
        g1, g2, g4 = guidance
        emb = self.time_mlp(timestep_embedding(t, self.emb_dim))
        h1 = self.inp(torch.cat([x_t, coarse_codes], 1)) + self.inject1(g1)
        h2 = self.enc2(self.down2(h1) + self.inject2(g2), emb)
        h4 = self.mid4(self.down4(h2) + self.inject4(g4), emb)
        h2 = self.dec2(h2 + F.interpolate(self.up2(h4), size=h2.shape[-2:], mode="nearest"), emb)
        h1 = self.dec1(h1 + F.interpolate(self.up1(h2), size=h1.shape[-2:], mode="nearest"))
        return self.out(h1) + self.coarse_scale * coarse_codes
