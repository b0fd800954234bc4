"""The IDGBR refiner: CG net + conditional denoiser + sampler, and its training loss."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .denoiser import Denoiser
from .diffusion import apply_guard_band, ddim_sample, guard_band_mask, mask_codes, q_sample
from .guidance import GuidanceNet


@dataclass
class RefinerConfig:
    in_channels: int = 3
    num_classes: int = 5
    guidance_widths: tuple[int, int, int] = (24, 48, 96)
    denoiser_widths: tuple[int, int, int] = (16, 48, 96)
    emb_dim: int = 128

    def to_dict(self) -> dict:
        return asdict(self)


class Refiner(nn.Module):
    def __init__(self, config: RefinerConfig) -> None:
        super().__init__()
        self.config = config
        self.guidance = GuidanceNet(config.in_channels, config.num_classes, config.guidance_widths)
        self.denoiser = Denoiser(config.num_classes, config.denoiser_widths, config.guidance_widths, config.emb_dim)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, image: torch.Tensor, coarse_ids: torch.Tensor
                ) -> torch.Tensor:
        """One denoiser call with fresh guidance: (B, K, H, W) logits of the clean map."""
        codes = mask_codes(coarse_ids, self.num_classes)
        return self.denoiser(x_t, t, codes, self.guidance(image, codes))

    @torch.no_grad()
    def sample(self, image: torch.Tensor, coarse_ids: torch.Tensor, noise: torch.Tensor, steps: int,
               strength: float = 1.0, guard_band: int = 0) -> torch.Tensor:
        """Refined logits (B, K, H, W). The CG net runs once; the denoiser runs ``steps`` times."""
        codes = mask_codes(coarse_ids, self.num_classes)
        guidance = self.guidance(image, codes)
        logits = ddim_sample(lambda x, t: self.denoiser(x, t, codes, guidance), noise, steps, strength, codes)
        return apply_guard_band(logits, coarse_ids, guard_band)

    def loss(self, image: torch.Tensor, coarse_ids: torch.Tensor, truth: torch.Tensor, ignore_index: int = 255,
             focus_band: int = 16) -> torch.Tensor:
        """x0-prediction cross-entropy against the truth, concentrated where the sampler may act.

        The guard band lets the refiner change pixels only near coarse boundaries, so pixels within
        ``focus_band`` px of one carry the loss (more on true boundaries and where the coarse map is wrong);
        the rest keep a small weight so that the map stays sensible with the band switched off.
        """
        batch = image.shape[0]
        valid = truth != ignore_index
        # Unlabelled pixels take the coarse class in x0, so the noisy input is defined everywhere.
        x0_ids = torch.where(valid, truth, coarse_ids)
        x0 = mask_codes(x0_ids, self.num_classes)
        # Bias towards high noise: the sampler starts at t = 1 and its first step matters most.
        t = torch.rand(batch, device=image.device) ** 0.7
        x_t = q_sample(x0, t, torch.randn_like(x0))
        logits = self.predict(x_t, t, image, coarse_ids)
        per_pixel = F.cross_entropy(logits, x0_ids, reduction="none")
        wrong = (coarse_ids != truth) & valid
        near_edge = guard_band_mask(x0_ids, 2)
        in_band = guard_band_mask(coarse_ids, focus_band)
        weight = valid.float() * (0.1 + in_band.float() * (1.0 + near_edge.float() + wrong.float()))
        return (per_pixel * weight).sum() / weight.sum().clamp(min=1.0)
