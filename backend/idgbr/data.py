"""Training data: the Dubai tiles in memory, random augmented crops, and normalisation statistics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .classes import IGNORE_ID, decode_dubai_mask, to_road_ids


@dataclass
class Scene:
    name: str
    image: np.ndarray  # (H, W, 3) uint8
    labels: np.ndarray  # (H, W) uint8 class ids, 255 = ignore
    extra: np.ndarray | None = None  # (H, W) uint8, e.g. an out-of-fold coarse map


def load_scenes(root: Path, tiles: list[str], task: str = "multiclass") -> list[Scene]:
    """Load every image/mask pair of the named tiles (e.g. ["tile1", "tile2"]) from the Dubai folder."""
    scenes = []
    for tile in tiles:
        images = sorted((root / tile / "images").glob("*.jpg"))
        if not images:
            raise FileNotFoundError(f"no images under {root / tile / 'images'}: is --data the dubai-aerial folder?")
        for image_path in images:
            mask_path = root / tile / "masks" / (image_path.stem + ".png")
            image = np.array(Image.open(image_path).convert("RGB"))
            labels = decode_dubai_mask(np.array(Image.open(mask_path).convert("RGB")))
            if task == "binary":
                labels = to_road_ids(labels)
            scenes.append(Scene(f"{tile}/{image_path.stem}", image, labels))
    return scenes


def channel_stats(scenes: list[Scene]) -> tuple[list[float], list[float]]:
    """Per-band mean and standard deviation in 8-bit units (the model card's normalisation)."""
    pixels = np.concatenate([s.image[::4, ::4].reshape(-1, 3) for s in scenes]).astype(np.float64)
    return pixels.mean(0).round(3).tolist(), pixels.std(0).round(3).tolist()


def normalize(image_u8: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """(B, C, H, W) values in 8-bit units -> normalised float32."""
    m = torch.tensor(mean, dtype=torch.float32, device=image_u8.device)[None, :, None, None]
    s = torch.tensor(std, dtype=torch.float32, device=image_u8.device)[None, :, None, None]
    return (image_u8.float() - m) / s


class CropSampler:
    """Random crops with geometric and photometric augmentation.

    Returns image (B, 3, S, S) float in 8-bit units, labels (B, S, S) int64 and, when scenes carry an
    extra map, extra (B, S, S) int64 cropped and transformed identically.
    """

    def __init__(self, scenes: list[Scene], crop: int, scale_range: tuple[float, float] = (0.75, 1.33),
                 seed: int = 0) -> None:
        self.scenes = scenes
        self.crop = crop
        self.scale_range = scale_range
        self.rng = np.random.default_rng(seed)
        areas = np.array([s.labels.size for s in scenes], dtype=np.float64)
        self.weights = areas / areas.sum()

    def _one(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        scene = self.scenes[self.rng.choice(len(self.scenes), p=self.weights)]
        height, width = scene.labels.shape
        size = int(round(self.crop * self.rng.uniform(*self.scale_range)))
        size = min(size, height, width)
        row = self.rng.integers(0, height - size + 1)
        col = self.rng.integers(0, width - size + 1)
        window = (slice(row, row + size), slice(col, col + size))
        extra = scene.extra[window] if scene.extra is not None else None
        return scene.image[window], scene.labels[window], extra

    def sample(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        images, labels, extras = [], [], []
        for _ in range(batch):
            image, label, extra = self._one()
            image_t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()[None]
            maps = [torch.from_numpy(np.ascontiguousarray(label)).float()]
            if extra is not None:
                maps.append(torch.from_numpy(np.ascontiguousarray(extra)).float())
            maps_t = torch.stack(maps)[None]
            if image_t.shape[-1] != self.crop or image_t.shape[-2] != self.crop:
                image_t = F.interpolate(image_t, size=(self.crop, self.crop), mode="bilinear", align_corners=False)
                maps_t = F.interpolate(maps_t, size=(self.crop, self.crop), mode="nearest")
            image_t, maps_t = self._geometric(image_t, maps_t)
            images.append(self._photometric(image_t[0]))
            labels.append(maps_t[0, 0])
            if extra is not None:
                extras.append(maps_t[0, 1])
        image_b = torch.stack(images)
        label_b = torch.stack(labels).long()
        extra_b = torch.stack(extras).long() if extras else None
        return image_b, label_b, extra_b

    def _geometric(self, image: torch.Tensor, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = int(self.rng.integers(0, 4))
        image, maps = torch.rot90(image, k, (2, 3)), torch.rot90(maps, k, (2, 3))
        if self.rng.random() < 0.5:
            image, maps = image.flip(3), maps.flip(3)
        return image, maps

    def _photometric(self, image: torch.Tensor) -> torch.Tensor:
        gain = torch.tensor(self.rng.uniform(0.92, 1.08, size=3), dtype=torch.float32)[:, None, None]
        brightness = float(self.rng.uniform(-20, 20))
        contrast = float(self.rng.uniform(0.8, 1.2))
        mean = image.mean()
        image = (image - mean) * contrast + mean + brightness
        return (image * gain).clamp(0, 255)


def valid_fraction(labels: torch.Tensor) -> float:
    return float((labels != IGNORE_ID).float().mean())
