"""Training data: the Dubai tiles in memory, random augmented crops, and normalisation statistics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .classes import DUBAI_BUILDING_ID, DUBAI_ROAD_ID, IGNORE_ID, decode_dubai_mask, to_binary_ids

# Which Dubai class a binary task keeps as its foreground.
BINARY_TASKS = {"binary": DUBAI_ROAD_ID, "roads": DUBAI_ROAD_ID, "buildings": DUBAI_BUILDING_ID}


@dataclass
class Scene:
    name: str
    image: np.ndarray  # (H, W, 3) uint8
    labels: np.ndarray  # (H, W) uint8 class ids, 255 = ignore
    extra: np.ndarray | None = None  # (H, W) or (S, H, W) uint8: real coarse maps of S models
    foreground: int | None = None  # binary scenes: the Dubai class id that is their class 1


def load_scenes(root: Path, tiles: list[str], task: str = "multiclass") -> list[Scene]:
    """Load every image/mask pair of the named tiles (e.g. ["tile1", "tile2"]) from the Dubai folder.

    ``task``: "multiclass" (the 5 classes), or a binary task: "binary"/"roads" (road vs. rest) or
    "buildings" (building vs. rest)."""
    scenes = []
    for tile in tiles:
        images = sorted((root / tile / "images").glob("*.jpg"))
        if not images:
            raise FileNotFoundError(f"no images under {root / tile / 'images'}: is --data the dubai-aerial folder?")
        for image_path in images:
            mask_path = root / tile / "masks" / (image_path.stem + ".png")
            image = np.array(Image.open(image_path).convert("RGB"))
            labels = decode_dubai_mask(np.array(Image.open(mask_path).convert("RGB")))
            if task in BINARY_TASKS:
                labels = to_binary_ids(labels, BINARY_TASKS[task])
            scenes.append(Scene(f"{tile}/{image_path.stem}", image, labels))
    return scenes


def load_accra(root: Path, split: str, factor: int, limit: int = 0) -> list[Scene]:
    """The Accra drone tiles (binary building masks) of ``split`` ("train" or "val"), each shrunk by ``factor``
    (area averaging for the image, nearest for the mask): about 0.05 m per pixel times ``factor``."""
    folder = root / split
    images = sorted((folder / "images").glob("*.jpg"))
    if not images:
        raise FileNotFoundError(f"no images under {folder / 'images'}: is the folder the accra-buildings dataset?")
    if limit:
        images = images[:limit]
    scenes = []
    for image_path in images:
        image = Image.open(image_path).convert("RGB")
        mask: Image.Image = Image.open(folder / "masks" / (image_path.stem + ".png"))
        size = (image.width // factor, image.height // factor)
        if factor > 1:
            image = image.resize(size, Image.Resampling.BOX)
            mask = mask.resize(size, Image.Resampling.NEAREST)
        labels = np.array(mask, dtype=np.uint8)
        labels[labels > 1] = IGNORE_ID
        scenes.append(Scene(f"accra/{split}/{image_path.stem}@{factor}", np.array(image), labels))
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
                 seed: int = 0, strong_photometric: bool = False, weights: np.ndarray | None = None) -> None:
        self.scenes = scenes
        self.crop = crop
        self.scale_range = scale_range
        self.strong = strong_photometric
        self.rng = np.random.default_rng(seed)
        # How often each scene is drawn: by area unless the caller weighs them.
        if weights is None:
            weights = np.array([s.labels.size for s in scenes], dtype=np.float64)
        self.weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)

    def _one(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        scene = self.scenes[self.rng.choice(len(self.scenes), p=self.weights)]
        height, width = scene.labels.shape
        # Log-uniform scale: as many crops zoomed in as zoomed out (other ground sample distances).
        low, high = np.log(self.scale_range[0]), np.log(self.scale_range[1])
        size = int(round(self.crop * np.exp(self.rng.uniform(low, high))))
        size = min(size, height, width)
        row = self.rng.integers(0, height - size + 1)
        col = self.rng.integers(0, width - size + 1)
        window = (slice(row, row + size), slice(col, col + size))
        extra = scene.extra
        if extra is not None and extra.ndim == 3:  # several models' maps: one of them at random
            extra = extra[self.rng.integers(0, extra.shape[0])]
        extra = extra[window] if extra is not None else None
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
                shrink = image_t.shape[-1] > self.crop  # area averaging when shrinking, as a coarser sensor would
                image_t = F.interpolate(image_t, size=(self.crop, self.crop), mode="area" if shrink else "bilinear",
                                        **({} if shrink else {"align_corners": False}))
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
        spread = 2.0 if self.strong else 1.0  # strong: another sensor, season or processing chain
        gain = torch.tensor(self.rng.uniform(1 - 0.08 * spread, 1 + 0.08 * spread, size=3),
                            dtype=torch.float32)[:, None, None]
        brightness = float(self.rng.uniform(-20, 20) * spread)
        contrast = float(self.rng.uniform(1 - 0.2 * spread, 1 + 0.2 * spread))
        mean = image.mean()
        image = (image - mean) * contrast + mean + brightness
        image = (image * gain).clamp(0, 255)
        if self.strong and self.rng.random() < 0.3:
            gamma = float(self.rng.uniform(0.7, 1.4))
            image = 255.0 * (image / 255.0) ** gamma
        if self.strong and self.rng.random() < 0.2:  # a softer lens or resampled imagery
            image = F.avg_pool2d(F.pad(image[None], (1, 1, 1, 1), mode="replicate"), 3, 1)[0]
        if self.strong and self.rng.random() < 0.2:  # sensor noise
            image = (image + torch.from_numpy(self.rng.normal(0, 4.0, image.shape).astype(np.float32))).clamp(0, 255)
        return image


def valid_fraction(labels: torch.Tensor) -> float:
    return float((labels != IGNORE_ID).float().mean())
