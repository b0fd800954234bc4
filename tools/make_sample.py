"""Cut the bundled sample (resources/sample/) from a held-out Dubai tile.

The Dubai images carry no georeference, so the sample gets a stated placeholder one:
EPSG:32640 (UTM 40N, which covers Dubai), 0.5 m pixels, upper-left corner at (320000, 2790000).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image
from rasterio.transform import from_origin

from idgbr.classes import decode_dubai_mask

SOURCE = "tile8/images/image_part_005.jpg"
WINDOW = (400, 300, 1000, 1000)  # col, row, width, height inside the source image
CRS = "EPSG:32640"
TRANSFORM = from_origin(320000.0, 2790000.0, 0.5, 0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/dubai-aerial"))
    parser.add_argument("--out", type=Path, default=Path("resources/sample"))
    args = parser.parse_args()
    col, row, width, height = WINDOW
    image = np.array(Image.open(args.data / SOURCE).convert("RGB"))[row : row + height, col : col + width]
    mask_path = args.data / SOURCE.replace("images", "masks").replace(".jpg", ".png")
    mask = decode_dubai_mask(np.array(Image.open(mask_path).convert("RGB")))[row : row + height, col : col + width]
    args.out.mkdir(parents=True, exist_ok=True)
    profile = dict(driver="GTiff", width=width, height=height, crs=CRS, transform=TRANSFORM,
                   tiled=True, blockxsize=256, blockysize=256, compress="deflate")
    with rasterio.open(args.out / "dubai_sample.tif", "w", count=3, dtype="uint8", **profile) as dst:
        dst.write(image.transpose(2, 0, 1))
        dst.colorinterp = [rasterio.enums.ColorInterp.red, rasterio.enums.ColorInterp.green,
                           rasterio.enums.ColorInterp.blue]
    with rasterio.open(args.out / "dubai_sample_labels.tif", "w", count=1, dtype="uint8", nodata=255,
                       **profile) as dst:
        dst.write(mask[None])
    print(f"wrote {args.out}/dubai_sample.tif and dubai_sample_labels.tif ({width}x{height})")


if __name__ == "__main__":
    main()
