"""The IDGBR refiner: CG net + conditional denoiser + constrained few-step sampler, and its training loss."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .compact import HalfResDenoiser, HalfResGuidanceNet
from .constraints import allowed_classes, constrain_logits, guard_band_mask
from .denoiser import Denoiser
from .diffusion import class_ids, ddim_sample, mask_codes, q_sample
from .guidance import GuidanceNet

REFINER_KIND = "idgbr-refiner/2"


@dataclass
class RefinerConfig:
    in_channels: int = 3
    num_classes: int = 5
    guidance_widths: tuple[int, ...] = (16, 32, 64, 96, 128)  # full, 1/2, 1/4, 1/8, 1/16 (from 1/2 at resolution 2)
    denoiser_widths: tuple[int, ...] = (16, 32, 64)  # full, 1/2, 1/4 (from 1/2 at resolution 2)
    emb_dim: int = 64
    kind: str = REFINER_KIND
    # The finest level the networks work at: 1 = full resolution, 2 = half (models/compact.py: pixel-unshuffle
    # in, pixel-shuffle out; about 1.7 times faster on a CPU).
    resolution: int = 1

    @classmethod
    def half_resolution(cls, in_channels: int, num_classes: int) -> RefinerConfig:
        return cls(in_channels=in_channels, num_classes=num_classes, guidance_widths=(32, 48, 96, 128),
                   denoiser_widths=(32, 64), resolution=2)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, spec: dict) -> RefinerConfig:
        return cls(**{**spec, "guidance_widths": tuple(spec["guidance_widths"]),
                      "denoiser_widths": tuple(spec["denoiser_widths"])})


class Refiner(nn.Module):
    def __init__(self, config: RefinerConfig) -> None:
        super().__init__()
        if config.kind != REFINER_KIND:
            raise ValueError(f"refiner kind {config.kind!r}; this backend builds {REFINER_KIND!r}")
        self.config = config
        self.guidance: nn.Module
        self.denoiser: nn.Module
        if config.resolution == 1:
            g1, g2, g4, g8, g16 = config.guidance_widths
            d1, d2, d4 = config.denoiser_widths
            self.guidance = GuidanceNet(config.in_channels, config.num_classes, (g1, g2, g4, g8, g16))
            self.denoiser = Denoiser(config.num_classes, (d1, d2, d4), (g1, g2, g4), config.emb_dim)
        elif config.resolution == 2:
            g2, g4, g8, g16 = config.guidance_widths
            d2, d4 = config.denoiser_widths
            self.guidance = HalfResGuidanceNet(config.in_channels, config.num_classes, (g2, g4, g8, g16))
            self.denoiser = HalfResDenoiser(config.num_classes, (d2, d4), (g2, g4), config.emb_dim)
        else:
            raise ValueError(f"refiner resolution {config.resolution}; this backend builds 1 (full) or 2 (half)")

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @torch.no_grad()
    def sample(self, image: torch.Tensor, coarse_ids: torch.Tensor, noise: torch.Tensor, steps: int,
               strength: float = 1.0, band: int | None = None, vocabulary: int | None = None) -> torch.Tensor:
        """Refined logits (B, K, H, W) under the band and vocabulary rules (None = rule off).
        The CG net runs once; the denoiser runs ``steps`` times."""
        codes = mask_codes(coarse_ids, self.num_classes)
        guidance = self.guidance(image, codes)
        allowed = allowed_classes(coarse_ids, self.num_classes, band, vocabulary)
        return ddim_sample(lambda x, t: self.denoiser(x, t, codes, guidance), noise, steps, strength, codes, allowed)

    def loss(self, image: torch.Tensor, coarse_ids: torch.Tensor, truth: torch.Tensor, band: int,
             generator: torch.Generator | None = None, ignore_index: int = 255) -> torch.Tensor:
        """x0-prediction cross-entropy on exactly the states the sampler visits, under its rules.

        Half of the batch starts from pure noise (t = 1, the sampler's first step). The other half is the
        sampler's later steps: the network's own first estimate, noised to t in [0.2, 0.8]. Training on noised
        *truth* instead teaches the network to trust x_t, which at inference holds its own errors.
        Only pixels where the rules (band and vocabulary, both ``band`` px) leave a choice, and where the
        true class is reachable, carry the loss: more on true boundaries and where the coarse map is wrong.
        """
        batch, k = image.shape[0], self.num_classes
        device = image.device
        valid = truth != ignore_index
        target = torch.where(valid, truth, coarse_ids)
        codes = mask_codes(coarse_ids, k)
        allowed = allowed_classes(coarse_ids, k, band, band)
        assert allowed is not None, "the loss needs band >= 0"
        guidance = self.guidance(image, codes)
        noise = torch.randn(codes.shape, generator=generator).to(device)
        with torch.no_grad():
            ones = torch.ones(batch, device=device)
            first = constrain_logits(self.denoiser(noise, ones, codes, [g.detach() for g in guidance]), allowed)
            first_codes = mask_codes(class_ids(first), k)
        later = (torch.rand(batch, generator=generator) < 0.5).to(device)
        t = torch.where(later, 0.2 + 0.6 * torch.rand(batch, generator=generator).to(device), ones)
        fresh = torch.randn(codes.shape, generator=generator).to(device)
        x_t = torch.where(later[:, None, None, None], q_sample(first_codes, t, fresh), noise)
        logits = constrain_logits(self.denoiser(x_t, t, codes, guidance), allowed)
        per_pixel = F.cross_entropy(logits.float(), target, reduction="none")
        reachable = allowed.gather(1, target[:, None])[:, 0]
        contested = allowed.sum(1) > 1
        wrong = (coarse_ids != target) & valid
        near_edge = guard_band_mask(target, 2)
        weight = (valid & reachable & contested).float() * (1.0 + near_edge.float() + 2.0 * wrong.float())
        return (per_pixel * weight).sum() / weight.sum().clamp(min=1.0)
