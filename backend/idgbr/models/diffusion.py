"""Noise schedule, mask codes, position-seeded noise and the few-step DDIM sampler."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from .constraints import constrain_logits

NOISE_BLOCK = 64  # noise is drawn per 64x64 block of the raster grid, so overlapping tiles agree


def alpha_bar(t: torch.Tensor, offset: float = 0.008) -> torch.Tensor:
    """Cosine schedule: share of signal left at continuous time t in [0, 1] (1 = pure noise)."""
    value = torch.cos((t + offset) / (1 + offset) * math.pi / 2) ** 2
    return value.clamp(1e-5, 1.0)


def mask_codes(ids: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, H, W) class ids -> (B, K, H, W) fixed codes: one-hot scaled to +-1 (well separated, never learned)."""
    one_hot = F.one_hot(ids.clamp(0, num_classes - 1), num_classes).permute(0, 3, 1, 2).float()
    return one_hot * 2.0 - 1.0


def class_ids(logits: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) -> (B, H, W) index of the largest logit, the first on ties (as ``argmax(1)``).

    A running maximum over the few class channels: ``argmax(1)`` on a channels-first tensor reduces across
    strided memory and took 7 % of a refine run on the CPU; this is about 6 times faster there."""
    best = logits[:, 0]
    ids = torch.zeros(best.shape, dtype=torch.long, device=logits.device)
    for k in range(1, logits.shape[1]):
        ids.masked_fill_(logits[:, k] > best, k)
        best = torch.maximum(best, logits[:, k])
    return ids


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Forward process: x_t = sqrt(a) x0 + sqrt(1 - a) noise, with a = alpha_bar(t) per batch item."""
    a = alpha_bar(t)[:, None, None, None]
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def position_noise(seed: int, origin: tuple[int, int], shape: tuple[int, int, int],
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Gaussian noise (K, H, W) for the raster window starting at ``origin`` (row, col).

    The value at a raster pixel depends only on the seed and the pixel's position, not on the tile
    layout, the tile order or the batch size, so overlapping tiles start from the same noise. On a CUDA
    device the noise is drawn there, by the GPU's generator: other values than the CPU's, as reproducible.
    """
    channels, height, width = shape
    row0, col0 = origin
    b_row0, b_col0 = row0 // NOISE_BLOCK, col0 // NOISE_BLOCK
    b_row1, b_col1 = (row0 + height - 1) // NOISE_BLOCK, (col0 + width - 1) // NOISE_BLOCK
    draw_on = torch.device(device)
    if draw_on.type != "cuda":
        draw_on = torch.device("cpu")
    canvas = torch.empty(channels, (b_row1 - b_row0 + 1) * NOISE_BLOCK, (b_col1 - b_col0 + 1) * NOISE_BLOCK,
                         device=draw_on)
    generator = torch.Generator(device=draw_on)
    for b_row in range(b_row0, b_row1 + 1):
        for b_col in range(b_col0, b_col1 + 1):
            generator.manual_seed((seed * 1_000_003 + b_row * 65_537 + b_col) % (2**63 - 1))
            r, c = (b_row - b_row0) * NOISE_BLOCK, (b_col - b_col0) * NOISE_BLOCK
            canvas[:, r : r + NOISE_BLOCK, c : c + NOISE_BLOCK] = torch.randn(
                channels, NOISE_BLOCK, NOISE_BLOCK, generator=generator, device=draw_on)
    r_off, c_off = row0 - b_row0 * NOISE_BLOCK, col0 - b_col0 * NOISE_BLOCK
    return canvas[:, r_off : r_off + height, c_off : c_off + width].to(device)


def ddim_sample(predict_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                steps: int, strength: float = 1.0, start_codes: torch.Tensor | None = None,
                allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) with x0-prediction. Returns the last step's logits (B, K, H, W).

    ``allowed`` (B, K, H, W) bool, from ``constraints.allowed_classes``, blocks forbidden classes at every
    step, so each step's x0 estimate is already a legal map.

    ``strength`` 1.0 starts from pure noise (the coarse map enters only through the guidance net);
    below 1.0 the start is the coarse map's codes (``start_codes``) noised to time ``strength``.
    """
    if steps < 1:
        raise ValueError("steps must be at least 1")
    batch = noise.shape[0]
    times = torch.linspace(strength, 0.0, steps + 1, device=noise.device)
    if strength >= 1.0 or start_codes is None:
        x_t = noise
    else:
        x_t = q_sample(start_codes, times[:1].expand(batch), noise)
    logits = None
    for i in range(steps):
        t_now = times[i].expand(batch)
        logits = constrain_logits(predict_logits(x_t, t_now), allowed)
        if i == steps - 1:
            break
        # The x0 estimate is the code of the predicted class: training only ever saw exact codes as x0, and a
        # soft (expected) code drifts off that distribution and compounds errors over the steps.
        x0 = mask_codes(class_ids(logits), logits.shape[1]).to(x_t.dtype)
        a_now, a_next = alpha_bar(times[i]), alpha_bar(times[i + 1])
        eps = (x_t - a_now.sqrt() * x0) / (1 - a_now).sqrt()
        x_t = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    assert logits is not None  # steps >= 1, so the loop ran
    return logits
