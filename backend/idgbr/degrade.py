"""Synthetic degradations of class maps, so the refiner learns to repair maps of *any* model.

Each turns a (B, H, W) id map into a plausible coarse prediction, across the scales of real models' errors:
blocky (output stride 4 to 32 px), boundaries displaced by 2 to 16 px (a smooth warp or a shift), eroded or
dilated classes, smoothed corners, lost thin structures and small spurious blobs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _one_hot(ids: torch.Tensor, k: int) -> torch.Tensor:
    return F.one_hot(ids.clamp(0, k - 1), k).permute(0, 3, 1, 2).float()


def _smooth_field(batch: int, height: int, width: int, cells: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth random field in [-1, 1] (B, 1, H, W) from bicubic upsampling of a coarse random grid."""
    coarse = torch.rand(batch, 1, cells, cells, generator=generator) * 2 - 1
    return F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False).clamp(-1, 1)


def block_majority(ids: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """Each ``block`` x ``block`` cell takes its majority class: a model with that output stride."""
    votes = F.avg_pool2d(_one_hot(ids, k), block, ceil_mode=True)
    return F.interpolate(votes, size=ids.shape[-2:], mode="nearest").argmax(1)


def blocky(ids: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    return block_majority(ids, k, int([4, 8, 12, 16, 24, 32][torch.randint(0, 6, (1,), generator=generator)]))


def smooth(ids: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Blurred probabilities then argmax: rounded corners and lost thin structures, like upsampled logits."""
    sigma = float(torch.empty(1).uniform_(2.0, 6.0, generator=generator))
    radius = int(2 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    probs = _one_hot(ids, k)
    probs = F.conv2d(F.pad(probs, (radius, radius, 0, 0), mode="replicate"),
                     kernel.view(1, 1, 1, -1).repeat(k, 1, 1, 1), groups=k)
    probs = F.conv2d(F.pad(probs, (0, 0, radius, radius), mode="replicate"),
                     kernel.view(1, 1, -1, 1).repeat(k, 1, 1, 1), groups=k)
    return probs.argmax(1)


def jitter(ids: torch.Tensor, k: int, generator: torch.Generator,
           amplitude_range: tuple[float, float] = (2.0, 16.0)) -> torch.Tensor:
    """Displace boundaries by a smooth random warp of 2 to 16 px."""
    batch, height, width = ids.shape
    amplitude = float(torch.empty(1).uniform_(*amplitude_range, generator=generator))
    cells = int(torch.randint(4, 12, (1,), generator=generator))
    dy = _smooth_field(batch, height, width, cells, generator) * amplitude * 2 / height
    dx = _smooth_field(batch, height, width, cells, generator) * amplitude * 2 / width
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    grid = torch.stack([xs[None] + dx[:, 0], ys[None] + dy[:, 0]], dim=-1)
    warped = F.grid_sample(ids[:, None].float(), grid, mode="nearest", padding_mode="border", align_corners=True)
    return warped[:, 0].long()


def shift(ids: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Move the whole map by 2 to 12 px (a misregistered map, or a model biased to one side)."""
    dy, dx = (int(v) for v in torch.randint(-12, 13, (2,), generator=generator))
    if abs(dy) < 2 and abs(dx) < 2:
        dx = 2 if dx >= 0 else -2
    height, width = ids.shape[-2:]
    padded = F.pad(ids[:, None].float(), (abs(dx), abs(dx), abs(dy), abs(dy)), mode="replicate")[:, 0].long()
    return padded[:, abs(dy) - dy : abs(dy) - dy + height, abs(dx) - dx : abs(dx) - dx + width]


def lose_thin(ids: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Parts of one class thinner than 3 to 11 px vanish into their surroundings (an opening), as thin roads
    and narrow gaps do in low-resolution predictions."""
    size = int([3, 5, 7, 9, 11][torch.randint(0, 5, (1,), generator=generator)])
    cls = int(torch.randint(0, k, (1,), generator=generator))
    mask = (ids == cls).float()[:, None]
    opened = F.max_pool2d(-F.max_pool2d(-mask, size, 1, size // 2), size, 1, size // 2)[:, 0] > 0
    lost = (ids == cls) & ~opened
    # A lost pixel takes the most common other class around it.
    others = _one_hot(ids, k)
    others[:, cls] = 0
    around = F.avg_pool2d(others, 2 * size + 1, 1, size, count_include_pad=False).argmax(1)
    return torch.where(lost, around, ids)


def erode_dilate(ids: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Grow one random class into its neighbours (dilation of it = erosion of the others)."""
    size = int([3, 5, 7, 9, 13, 17][torch.randint(0, 6, (1,), generator=generator)])
    cls = int(torch.randint(0, k, (1,), generator=generator))
    grown = F.max_pool2d((ids == cls).float()[:, None], size, 1, size // 2)[:, 0] > 0
    return torch.where(grown, torch.full_like(ids, cls), ids)


def spurious_blobs(ids: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Scatter small blobs (a few to ~30 px) of one class: false detections and holes, as CNNs and pixel
    classifiers make them. Small on purpose: their shape, not the image alone, tells they are wrong."""
    batch, height, width = ids.shape
    cells = max(4, min(height, width) // int(torch.randint(12, 40, (1,), generator=generator)))
    field = _smooth_field(batch, height, width, cells, generator)[:, 0]
    blobs = field > float(torch.empty(1).uniform_(0.75, 0.92, generator=generator))
    cls = int(torch.randint(0, k, (1,), generator=generator))
    return torch.where(blobs, torch.full_like(ids, cls), ids)


def mild_displacement(ids: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Boundaries displaced by a smooth warp of 2 to 5 px and nothing else: the map of a good model, which the
    refiner must mostly keep. Without these the refiner only ever saw clearly wrong maps and overruled good ones."""
    return jitter(ids, k, generator, (2.0, 5.0))


# Share of batches whose only error is a mild displacement.
MILD_SHARE = 0.25

# Boundary and small-blob errors only. Whole-region class flips were tried and taught the refiner to overrule the coarse
# map's semantics, which it then did wrongly on unseen imagery (mIoU fell); semantics are the coarse model's job.
DEGRADATIONS = (blocky, smooth, jitter, shift, erode_dilate, lose_thin, spurious_blobs)


def random_degradation(ids: torch.Tensor, k: int, generator: torch.Generator, ignore_index: int = 255
                       ) -> torch.Tensor:
    """Apply one to three random degradations to a (B, H, W) id map, or (``MILD_SHARE`` of the time) only a mild
    displacement; ignore pixels are filled first."""
    filled = ids.clone()
    if (filled == ignore_index).any():
        # Unlabelled pixels become class 0 so that the degradations see a complete map.
        filled[filled == ignore_index] = 0
    if torch.rand(1, generator=generator).item() < MILD_SHARE:
        return mild_displacement(filled, k, generator)
    count = int(torch.randint(1, 4, (1,), generator=generator))
    order = torch.randperm(len(DEGRADATIONS), generator=generator)[:count]
    for index in order.tolist():
        filled = DEGRADATIONS[index](filled, k, generator)
    return filled
