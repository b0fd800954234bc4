"""The refiner's never-harm rules, applied to logits inside the sampler (not to the output afterwards).

Boundary refinement moves boundaries; it does not re-segment. Three rules, each switchable:
- **band**: a pixel may change only within ``band`` px (Chebyshev distance) of a coarse class boundary;
- **vocabulary**: a pixel may only take a class that the coarse map has within ``vocabulary`` px, so regions
  are never invented or erased;
- **confidence**: a change is kept only where the refiner's probability of the new class is at least
  ``min_confidence``; elsewhere the coarse class stays.

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


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Square dilation of a (B, C, H, W) float mask; separable max-pools (same result, a fraction of the cost)."""
    if radius <= 0:
        return mask
    size = 2 * radius + 1
    mask = F.max_pool2d(mask, kernel_size=(1, size), stride=1, padding=(0, radius))
    return F.max_pool2d(mask, kernel_size=(size, 1), stride=1, padding=(radius, 0))


def guard_band_mask(coarse_ids: torch.Tensor, band: int) -> torch.Tensor:
    """(B, H, W) bool: pixels within ``band`` px of a coarse class boundary."""
    return _dilate(boundary_map(coarse_ids).float()[:, None], band)[:, 0] > 0


def vocabulary_mask(coarse_ids: torch.Tensor, num_classes: int, radius: int) -> torch.Tensor:
    """(B, K, H, W) bool: class k is allowed at a pixel when the coarse map has k within ``radius`` px."""
    one_hot = F.one_hot(coarse_ids.clamp(0, num_classes - 1), num_classes).permute(0, 3, 1, 2).float()
    return _dilate(one_hot, radius) > 0


def allowed_classes(coarse_ids: torch.Tensor, num_classes: int, band: int | None, vocabulary: int | None
                    ) -> torch.Tensor | None:
    """(B, K, H, W) bool of the classes each pixel may take, or None when no rule is on.

    ``band`` / ``vocabulary`` None or negative switch a rule off; 0 means "no change anywhere".
    """
    rules_on = [r is not None and r >= 0 for r in (band, vocabulary)]
    if not any(rules_on):
        return None
    one_hot = F.one_hot(coarse_ids.clamp(0, num_classes - 1), num_classes).permute(0, 3, 1, 2).bool()
    allowed = torch.ones_like(one_hot)
    if rules_on[1]:
        assert vocabulary is not None  # rules_on[1]: vocabulary is set
        allowed &= vocabulary_mask(coarse_ids, num_classes, int(vocabulary))
    if rules_on[0]:
        assert band is not None  # rules_on[0]: band is set
        inside = guard_band_mask(coarse_ids, int(band))[:, None] if band > 0 else torch.zeros_like(one_hot[:, :1])
        allowed &= inside | one_hot
    return allowed


def constrain_logits(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """Logits with every forbidden class blocked (the coarse class is always allowed)."""
    if allowed is None:
        return logits
    return logits.masked_fill(~allowed, BLOCKED)


def gate_changes(log_probs: torch.Tensor, coarse_ids: torch.Tensor, min_confidence: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Final decision from (B, K, H, W) log-probabilities (or unnormalised logits).

    Returns ids (B, H, W) and the confidence (B, H, W): the refiner's probability of the class written.
    A pixel takes the refiner's class only where that class's probability reaches ``min_confidence``;
    otherwise it keeps the coarse class (and reports the refiner's probability of it).
    """
    probs = torch.softmax(log_probs.float(), dim=1)
    best_prob, best = probs.max(dim=1)
    coarse = coarse_ids.clamp(0, log_probs.shape[1] - 1)
    keep_coarse = (best != coarse) & (best_prob < min_confidence)
    ids = torch.where(keep_coarse, coarse, best)
    confidence = probs.gather(1, ids[:, None])[:, 0]
    return ids, confidence
