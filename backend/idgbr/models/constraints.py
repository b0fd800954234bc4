"""The refiner's never-harm rules, applied to logits inside the sampler (not to the output afterwards).

Boundary refinement moves boundaries; it does not re-segment. Three rules, each switchable:
- **band**: a pixel may change only within ``band`` px (Chebyshev distance) of a coarse class boundary;
- **vocabulary**: a pixel may only take a class that the coarse map has within ``vocabulary`` px, so regions
  are never invented or erased;
- **confidence**: a change is kept only where the refiner prefers the new class over the coarse class with a
  probability of at least ``min_confidence`` (the two classes' probabilities renormalised between them);
  elsewhere the coarse class stays.

The first two shape the logits at every sampler step (so later steps start from a legal map); the third
is a decision on the final, blended probabilities (``gate_changes``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCKED = -1.0e4  # logit of a class a pixel may not take (finite: softmax stays defined in half precision)


def boundary_map(ids: torch.Tensor) -> torch.Tensor:
    """(B, H, W) ids -> (B, H, W) bool, true where a 4-neighbour has another class."""
    edge = torch.zeros_like(ids, dtype=torch.bool)
    vertical = ids[:, 1:, :] != ids[:, :-1, :]
    horizontal = ids[:, :, 1:] != ids[:, :, :-1]
    edge[:, 1:, :] |= vertical
    edge[:, :-1, :] |= vertical
    edge[:, :, 1:] |= horizontal
    edge[:, :, :-1] |= horizontal
    return edge


def _window_max(mask: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """Max over a window of 2 * radius + 1 along ``dim`` (2 or 3) of a (B, C, H, W) integer mask, zero outside.

    Window maxima by doubling: after each step a pixel holds the max over twice as many neighbours, so a
    window of w costs about log2(w) elementwise maxima on uint8 (memory speed) instead of w comparisons per
    pixel in a float max-pool: about 90x faster at the default 16 px on a CPU."""
    size = mask.shape[dim]
    pad = [0, 0, 0, 0]
    side = 0 if dim == 3 else 2
    pad[side], pad[side + 1] = radius, radius
    out = F.pad(mask, pad)
    width, span = 2 * radius + 1, 1  # out[i] holds the max over padded[i .. i + span - 1]
    while span < width:
        step = min(span, width - span)
        length = out.shape[dim] - step
        out = torch.maximum(out.narrow(dim, 0, length), out.narrow(dim, step, length))
        span += step
    return out.narrow(dim, 0, size)


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Square (Chebyshev) dilation of a (B, C, H, W) bool mask; separable, rows then columns."""
    if radius <= 0:
        return mask
    as_bytes = mask.to(torch.uint8)
    return _window_max(_window_max(as_bytes, radius, 3), radius, 2).bool()


def guard_band_mask(coarse_ids: torch.Tensor, band: int) -> torch.Tensor:
    """(B, H, W) bool: pixels within ``band`` px of a coarse class boundary."""
    return _dilate(boundary_map(coarse_ids)[:, None], band)[:, 0]


def _one_hot(coarse_ids: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, H, W) ids -> (B, K, H, W) bool."""
    return F.one_hot(coarse_ids.clamp(0, num_classes - 1), num_classes).permute(0, 3, 1, 2).bool()


def vocabulary_mask(coarse_ids: torch.Tensor, num_classes: int, radius: int) -> torch.Tensor:
    """(B, K, H, W) bool: class k is allowed at a pixel when the coarse map has k within ``radius`` px."""
    return _dilate(_one_hot(coarse_ids, num_classes), radius)


def allowed_classes(coarse_ids: torch.Tensor, num_classes: int, band: int | None, vocabulary: int | None
                    ) -> torch.Tensor | None:
    """(B, K, H, W) bool of the classes each pixel may take, or None when no rule is on.

    ``band`` / ``vocabulary`` None or negative switch a rule off; 0 means "no change anywhere".
    """
    band_px = -1 if band is None else int(band)
    vocabulary_px = -1 if vocabulary is None else int(vocabulary)
    if band_px < 0 and vocabulary_px < 0:
        return None
    one_hot = _one_hot(coarse_ids, num_classes)
    if vocabulary_px >= 0:
        allowed = _dilate(one_hot, vocabulary_px)
        # Without a boundary within B px a pixel's whole (2B+1)-square has its own class, so its vocabulary
        # of radius R <= B holds only that class: the band rule is already in force (the default, R = B).
        if band_px < 0 or vocabulary_px <= band_px:
            return allowed
    else:
        allowed = torch.ones_like(one_hot)
    inside = guard_band_mask(coarse_ids, band_px)[:, None] if band_px > 0 else torch.zeros_like(one_hot[:, :1])
    return allowed & (inside | one_hot)


def constrain_logits(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """Logits with every forbidden class blocked (the coarse class is always allowed)."""
    if allowed is None:
        return logits
    return logits.masked_fill(~allowed, BLOCKED)


def gate_changes(log_probs: torch.Tensor, coarse_ids: torch.Tensor, min_confidence: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Final decision from (B, K, H, W) log-probabilities (or unnormalised logits).

    Returns ids (B, H, W) and the confidence (B, H, W): the refiner's probability of the class written.
    A pixel takes the refiner's class only where the refiner prefers it over the coarse class with at least
    ``min_confidence``: p(new) / (p(new) + p(coarse)). Otherwise it keeps the coarse class (and reports the
    refiner's probability of it). The question asked is "new class or coarse class?": probability that the
    refiner gives to a third class is no evidence for either, so it neither blocks nor allows a change. In a
    binary task this is the new class's probability itself; 0.5 and below let every preferred change through.
    """
    probs = torch.softmax(log_probs.float(), dim=1)
    best_prob, best = probs.max(dim=1)
    coarse = coarse_ids.clamp(0, log_probs.shape[1] - 1)
    coarse_prob = probs.gather(1, coarse[:, None])[:, 0]
    # best_prob is the largest probability, so the sum is positive (softmax of finite logits).
    preference = best_prob / (best_prob + coarse_prob)
    keep_coarse = (best != coarse) & (preference < min_confidence)
    ids = torch.where(keep_coarse, coarse, best)
    confidence = probs.gather(1, ids[:, None])[:, 0]
    return ids, confidence
