"""Classical baselines for the model card: a superpixel refiner and a pixel classifier.

- ``superpixel_refine``: SLIC superpixels of the image, each taking the coarse map's majority class —
  the cheap refiner the diffusion refiner has to beat.
- ``PixelClassifier``: a gradient-boosted per-pixel classifier on colour and local texture features, a
  discriminative model of a very different kind from the CNN, to test refinement of *other* models' maps.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .classes import IGNORE_ID


def superpixel_refine(image: np.ndarray, coarse: np.ndarray, num_classes: int, region_px: int = 150,
                      compactness: float = 10.0) -> np.ndarray:
    """(H, W, 3) uint8 image and (H, W) coarse ids -> ids where each SLIC superpixel takes its majority class."""
    from skimage.segmentation import slic

    segments = slic(image, n_segments=max(1, image.shape[0] * image.shape[1] // region_px),
                    compactness=compactness, start_label=0)
    votes = np.zeros((segments.max() + 1, num_classes), np.int64)
    np.add.at(votes, (segments.ravel(), np.clip(coarse.ravel(), 0, num_classes - 1)), 1)
    return votes.argmax(1)[segments].astype(np.uint8)


def pixel_features(image: np.ndarray, step: int = 2) -> np.ndarray:
    """(H, W, 3) uint8 -> (H//step * W//step, F) features: colour, and local mean/std at three scales."""
    small = image[::step, ::step].astype(np.float32)
    grey = small.mean(2)
    features = [small[..., c] for c in range(3)]
    features.append(small.max(2) - small.min(2))  # a saturation proxy
    for size in (5, 11, 25):
        mean = ndimage.uniform_filter(grey, size)
        sq = ndimage.uniform_filter(grey**2, size)
        features += [mean, np.sqrt(np.maximum(sq - mean**2, 0))]
        for c in range(3):
            features.append(ndimage.uniform_filter(small[..., c], size))
    return np.stack(features, -1).reshape(-1, len(features))


class PixelClassifier:
    """Histogram gradient boosting on ``pixel_features``; predicts at 1/``step`` resolution, upsampled nearest."""

    def __init__(self, step: int = 2, seed: int = 0) -> None:
        from sklearn.ensemble import HistGradientBoostingClassifier

        self.step = step
        self.model = HistGradientBoostingClassifier(max_iter=150, learning_rate=0.15, random_state=seed)
        self.rng = np.random.default_rng(seed)

    def fit(self, images: list[np.ndarray], labels: list[np.ndarray], samples_per_image: int = 20000
            ) -> PixelClassifier:
        xs, ys = [], []
        for image, label in zip(images, labels):
            features = pixel_features(image, self.step)
            target = label[:: self.step, :: self.step].ravel()
            keep = np.flatnonzero(target != IGNORE_ID)
            pick = self.rng.choice(keep, size=min(samples_per_image, keep.size), replace=False)
            xs.append(features[pick])
            ys.append(target[pick])
        self.model.fit(np.concatenate(xs), np.concatenate(ys))
        return self

    def predict(self, image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        small_shape = image[:: self.step, :: self.step].shape[:2]
        ids = self.model.predict(pixel_features(image, self.step)).reshape(small_shape).astype(np.uint8)
        return np.repeat(np.repeat(ids, self.step, 0), self.step, 1)[:height, :width]
