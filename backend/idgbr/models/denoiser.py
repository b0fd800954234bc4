"""The conditional denoising U-Net: predicts the clean class map (as logits) from a noisy mask code.

It works on a pixel-unshuffled copy of the noisy code and of the coarse map's code (1/4 resolution, no
information lost), receives the CG pyramid at 1/2, 1/4 and 1/8 through zero-initialised convolutions,
and is modulated by the timestep embedding. Its output is a correction added to the coarse map's code
(a learned scale), so an untrained refiner returns the coarse map and training learns where to depart
from it. Its cost per sampler step is what limits speed, so it is the smallest part.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ResBlock, conv3x3, timestep_embedding, zero_conv


class Denoiser(nn.Module):
    """x_t and coarse codes (B, K, H, W), t (B,), guidance pyramid -> (B, K, H, W) logits of the clean map."""

    def __init__(self, num_classes: int, widths: tuple[int, int, int], guidance_widths: tuple[int, int, int],
                 emb_dim: int = 128) -> None:
        super().__init__()
        w2, w4, w8 = widths
        g2, g4, g8 = guidance_widths
        self.emb_dim = emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.inp = nn.Conv2d(2 * 16 * num_classes, w4, 1)
        self.coarse_scale = nn.Parameter(torch.tensor(2.0))
        self.inject4 = zero_conv(g4, w4)
        self.enc4 = ResBlock(w4, emb_dim)
        self.down = conv3x3(w4, w8, stride=2)
        self.inject8 = zero_conv(g8, w8)
        self.mid8 = ResBlock(w8, emb_dim)
        self.up = nn.Conv2d(w8, w4, 1)
        self.dec4 = ResBlock(w4, emb_dim)
        self.to_half = nn.Conv2d(w4, 4 * w2, 1)
        self.inject2 = zero_conv(g2, w2)
        self.dec2 = nn.Sequential(conv3x3(w2, w2), nn.SiLU())
        self.out = nn.Conv2d(w2, 4 * num_classes, 1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, coarse_codes: torch.Tensor, guidance: list[torch.Tensor]
                ) -> torch.Tensor:
        g2, g4, g8 = guidance
        emb = self.time_mlp(timestep_embedding(t, self.emb_dim))
        h4 = self.inp(F.pixel_unshuffle(torch.cat([x_t, coarse_codes], 1), 4)) + self.inject4(g4)
        h4 = self.enc4(h4, emb)
        h8 = self.mid8(self.down(h4) + self.inject8(g8), emb)
        h4 = self.dec4(h4 + F.interpolate(self.up(h8), scale_factor=2.0, mode="nearest"), emb)
        h2 = F.pixel_shuffle(self.to_half(h4), 2) + self.inject2(g2)
        correction = F.pixel_shuffle(self.out(self.dec2(h2)), 2)
        return correction + self.coarse_scale * coarse_codes
