"""The speed reference of ``idgbr bench``: a plain U-Net with a ResNet-34 encoder, the segmenter a user would
pick instead of IDGBR, run over the same raster with the same tiles.

Only its cost matters, so its weights are random (BatchNorm in eval mode, as at inference). The run does what
a plain tiled segmenter does: read each tile, normalise it, run the network, take the arg max of the tile's
centre and write it into a GeoTIFF on the input's grid; no blending of overlaps (cheaper than ours, so the
comparison favours the reference).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from .precision import autocast, resolve_precision
from .raster.windows import TileGrid

ENCODER_BLOCKS = (3, 4, 6, 3)  # ResNet-34
ENCODER_WIDTHS = (64, 128, 256, 512)
DECODER_WIDTHS = (256, 128, 64, 32, 16)  # the usual U-Net decoder over a ResNet-34


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = functional.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return functional.relu(out + (x if self.down is None else self.down(x)), inplace=True)


class ResNet34UNet(nn.Module):
    """ResNet-34 encoder (strides 2 to 32) and a U-Net decoder back to full resolution."""

    def __init__(self, in_channels: int = 3, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(inplace=True))
        self.pool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], 64
        for i, (blocks, width) in enumerate(zip(ENCODER_BLOCKS, ENCODER_WIDTHS)):
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(cin, width, stride)] + [BasicBlock(width, width, 1) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            cin = width
        self.stages = nn.ModuleList(stages)
        skips = (256, 128, 64, 64, 0)  # encoder features at 1/16, 1/8, 1/4, 1/2 and none at full size
        decoder, cin = [], ENCODER_WIDTHS[-1]
        for width, skip in zip(DECODER_WIDTHS, skips):
            decoder.append(nn.Sequential(_conv_bn_relu(cin + skip, width), _conv_bn_relu(width, width)))
            cin = width
        self.decoder = nn.ModuleList(decoder)
        self.head = nn.Conv2d(DECODER_WIDTHS[-1], classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.stem(x)
        features = [half]
        y = self.pool(half)
        for stage in self.stages:
            y = stage(y)
            features.append(y)
        # features: 1/2 (stem), 1/4, 1/8, 1/16, 1/32; the decoder climbs from 1/32 using 1/16 .. 1/2.
        skips = [features[3], features[2], features[1], features[0], None]
        for block, skip in zip(self.decoder, skips):
            y = functional.interpolate(y, scale_factor=2.0, mode="nearest")
            if skip is not None:
                y = torch.cat([y, skip], dim=1)
            y = block(y)
        return self.head(y)


def run_reference(input_path: Path, output_path: Path, tile: int, overlap: int, classes: int,
                  precision: str | None) -> dict:
    """Segment ``input_path`` with the reference network; returns the seconds and the output's size."""
    import rasterio
    from rasterio.windows import Window

    started = time.perf_counter()
    device = torch.device("cpu")
    chosen = resolve_precision(precision, device)
    torch.manual_seed(0)
    net = ResNet34UNet(classes=classes).eval()
    net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stubs lack it
    multiple = 32  # the encoder's output stride
    with rasterio.open(input_path) as src:
        grid = TileGrid(src.height, src.width, tile, overlap, multiple)
        profile = {"driver": "GTiff", "width": src.width, "height": src.height, "count": 1, "dtype": "uint8",
                   "crs": src.crs, "transform": src.transform, "tiled": True, "blockxsize": 256,
                   "blockysize": 256, "compress": "deflate", "nodata": 255}
        half = overlap // 2
        with rasterio.open(output_path, "w", **profile) as dst, torch.inference_mode():
            for y in grid.rows:
                for x in grid.cols:
                    pixels = src.read([1, 2, 3], window=Window(x, y, grid.tile_w, grid.tile_h))
                    batch = torch.from_numpy(pixels.astype(np.float32) / 255.0 - 0.5)[None]
                    batch = batch.contiguous(memory_format=torch.channels_last)
                    with autocast(chosen, device):
                        logits = net(batch)
                    classes_map = logits[0].argmax(0).to(torch.uint8).numpy()
                    # Keep the tile's centre: its half of each overlap with a neighbour.
                    top = 0 if y == grid.rows[0] else half
                    left = 0 if x == grid.cols[0] else half
                    bottom = grid.tile_h if y == grid.rows[-1] else grid.tile_h - half
                    right = grid.tile_w if x == grid.cols[-1] else grid.tile_w - half
                    dst.write(classes_map[top:bottom, left:right],
                              1, window=Window(x + left, y + top, right - left, bottom - top))
    return {"seconds": time.perf_counter() - started, "width": grid.width, "height": grid.height,
            "tiles": grid.count, "precision": chosen}


def reference_flops_per_mp(tile: int = 512, classes: int = 5) -> float:
    """Multiply-adds x 2 per megapixel of the network's input, counted on one tile."""
    net = ResNet34UNet(classes=classes).eval()
    total = 0

    def count(module: nn.Conv2d, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        kernel = int(module.kernel_size[0]) * int(module.kernel_size[1])
        total += 2 * output.numel() * kernel * module.in_channels // module.groups

    hooks = [m.register_forward_hook(count) for m in net.modules() if isinstance(m, nn.Conv2d)]
    with torch.inference_mode():
        net(torch.zeros(1, 3, tile, tile))
    for hook in hooks:
        hook.remove()
    return total / (tile * tile / 1e6)
