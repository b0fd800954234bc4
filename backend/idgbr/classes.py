"""Class tables of the bundled models and decoding of the Dubai colour masks."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

IGNORE_ID = 255


@dataclass(frozen=True)
class ClassInfo:
    id: int
    name: str
    color: str  # "#RRGGBB"

    def to_dict(self) -> dict:
        return asdict(self)


# Ids and colours measured on the Dubai masks (see the dataset README); the public classes.json differs.
DUBAI_CLASSES: tuple[ClassInfo, ...] = (
    ClassInfo(0, "water", "#E2A929"),
    ClassInfo(1, "land (unpaved)", "#8429F6"),
    ClassInfo(2, "road", "#6EC1E4"),
    ClassInfo(3, "building", "#3C1098"),
    ClassInfo(4, "vegetation", "#FEDD3A"),
)
ROAD_CLASSES: tuple[ClassInfo, ...] = (
    ClassInfo(0, "background", "#D9D9D9"),
    ClassInfo(1, "road", "#E8412C"),
)
BUILDING_CLASSES: tuple[ClassInfo, ...] = (
    ClassInfo(0, "background", "#D9D9D9"),
    ClassInfo(1, "building", "#C0392B"),
)
DUBAI_ROAD_ID = 2
DUBAI_BUILDING_ID = 3


def hex_to_rgb(color: str) -> tuple[int, int, int]:
    value = color.lstrip("#")
    return int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16)


def decode_dubai_mask(rgb: np.ndarray, max_distance: float = 40.0) -> np.ndarray:
    """Turn an (H, W, 3) colour mask into (H, W) uint8 class ids; unknown colours become IGNORE_ID.

    Nearest palette colour within ``max_distance`` so that slightly off colours still decode.
    """
    palette = np.array([hex_to_rgb(c.color) for c in DUBAI_CLASSES], dtype=np.int32)
    pixels = rgb.reshape(-1, 3).astype(np.int32)
    distances = ((pixels[:, None, :] - palette[None, :, :]) ** 2).sum(-1)
    ids = distances.argmin(1).astype(np.uint8)
    ids[distances.min(1) > max_distance**2] = IGNORE_ID
    return ids.reshape(rgb.shape[:2])


def to_binary_ids(dubai_ids: np.ndarray, class_id: int) -> np.ndarray:
    """A binary task from the 5-class ids: ``class_id`` = 1, everything else = 0, ignore kept."""
    out = (dubai_ids == class_id).astype(np.uint8)
    out[dubai_ids == IGNORE_ID] = IGNORE_ID
    return out

