"""Training of the coarse segmenter and of the refiner (`idgbr train coarse|refiner`)."""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import load_checkpoint, save_checkpoint
from .classes import DUBAI_CLASSES, DUBAI_ROAD_ID, IGNORE_ID, ROAD_CLASSES
from .data import CropSampler, Scene, channel_stats, load_scenes, normalize
from .degrade import random_degradation
from .errors import IdgbrError
from .model_bundle import ModelBundle, build_bundle, build_coarse, select_device
from .models.coarse import CoarseConfig
from .models.fcn import FCN_KIND, FcnConfig
from .models.refiner import Refiner, RefinerConfig

# What validation chose for both bundled models; `python -m idgbr.validate` rewrites it per model.
DEFAULT_SAMPLER = {"steps": 2, "strength": 1.0, "guard_band": 0, "seed": 0}


def base_card(name: str, task: str, mean: list[float], std: list[float]) -> dict:
    classes = DUBAI_CLASSES if task == "multiclass" else ROAD_CLASSES
    return {
        "name": name,
        "task": task,
        "num_classes": len(classes),
        "classes": [c.to_dict() for c in classes],
        "bands": ["red", "green", "blue"],
        "bands_default": [1, 2, 3],
        "normalization": {"mean": mean, "std": std, "units": "8-bit digital numbers"},
        "tile_size": 512,
        "overlap": 64,
        "size_multiple": 16,
        # The Dubai imagery states no ground sample distance; 0.5 m is the nominal value we assume.
        "pixel_size_m": 0.5,
        "sampler": dict(DEFAULT_SAMPLER),
        "architecture": {},
        "parts": [],
        "training": {},
        "metrics": {},
    }


class Schedule:
    """Cosine learning-rate decay over a budget of iterations or of wall-clock minutes, whichever ends first."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, iterations: int, minutes: float | None):
        self.optimizer, self.lr, self.iterations = optimizer, lr, iterations
        self.deadline = time.monotonic() + minutes * 60 if minutes else None
        self.start = time.monotonic()

    def progress(self, iteration: int) -> float:
        by_iter = iteration / self.iterations
        if self.deadline is None:
            return by_iter
        by_time = (time.monotonic() - self.start) / (self.deadline - self.start)
        return max(by_iter, by_time)

    def step(self, iteration: int) -> bool:
        """Set the learning rate; False when the budget is spent."""
        done = self.progress(iteration)
        if done >= 1.0:
            return False
        warmup = min(1.0, (iteration + 1) / 100)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * warmup * 0.5 * (1 + math.cos(math.pi * done))
        return True


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _iterations(scenes: list[Scene], crop: int, batch: int, epochs: float) -> int:
    """One epoch = as many crops as cover the training pixels once."""
    pixels = sum(s.labels.size for s in scenes)
    return max(1, int(epochs * pixels / (crop * crop) / batch))


def inverse_sqrt_frequency(scenes: list[Scene], num_classes: int) -> torch.Tensor:
    """Class weights (mean 1): rare, thin classes (roads) would otherwise be swamped by unpaved land."""
    counts = np.bincount(np.concatenate([s.labels[::8, ::8].ravel() for s in scenes]), minlength=256)
    freq = counts[:num_classes] / max(1, counts[:num_classes].sum())
    weight = torch.tensor(1 / np.sqrt(freq + 1e-3), dtype=torch.float32)
    return weight / weight.mean()


def _log(message: str) -> None:
    print(message, flush=True)


def train_coarse(data: Path, out: Path, tiles: list[str], task: str, epochs: float, minutes: float | None,
                 batch: int, crop: int, lr: float, device_name: str, seed: int, architecture: str = "encoder-decoder"
                 ) -> dict:
    torch.manual_seed(seed)
    device = select_device(device_name)
    scenes = load_scenes(data, tiles, task)
    mean, std = channel_stats(scenes)
    card = base_card(out.stem, task, mean, std)
    config = (FcnConfig if architecture == FCN_KIND else CoarseConfig)(num_classes=card["num_classes"])
    model = build_coarse(config.to_dict()).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    iterations = _iterations(scenes, crop, batch, epochs)
    schedule = Schedule(optimizer, lr, iterations, minutes)
    sampler = CropSampler(scenes, crop, seed=seed)
    class_weight = inverse_sqrt_frequency(scenes, card["num_classes"]).to(device)
    model.train()
    iteration, running, started = 0, 0.0, time.monotonic()
    while schedule.step(iteration):
        images, labels, _ = sampler.sample(batch)
        images = normalize(images, mean, std).to(device)
        labels = labels.to(device)
        with _autocast(device):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, weight=class_weight, ignore_index=IGNORE_ID)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running = 0.98 * running + 0.02 * loss.item() if iteration else loss.item()
        iteration += 1
        if iteration % 50 == 0:
            _log(f"coarse it {iteration} loss {running:.4f} {time.monotonic() - started:.0f}s")
    card["architecture"]["coarse"] = config.to_dict()
    card["parts"] = ["coarse"]
    card["training"]["coarse"] = {
        "tiles": tiles, "iterations": iteration, "batch": batch, "crop": crop, "lr": lr, "seed": seed,
        "minutes": round((time.monotonic() - started) / 60, 1), "device": str(device), "final_loss": round(running, 4),
    }
    save_checkpoint(out, {f"coarse.{k}": v for k, v in model.state_dict().items()}, card)
    _log(f"wrote {out}")
    return card


@torch.inference_mode()
def predict_scene(bundle: ModelBundle, scene: Scene, task: str) -> np.ndarray:
    """Coarse ids of a whole scene with a coarse model (used for out-of-fold predictions)."""
    card = bundle.card
    image = bundle.normalize(scene.image.transpose(2, 0, 1))
    height, width = image.shape[-2:]
    multiple = card["size_multiple"]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    image = F.pad(image, (0, pad_w, 0, pad_h), mode="reflect")
    ids = bundle.segment(image)[0, :, :height, :width].argmax(0).byte().cpu().numpy()
    if task == "binary" and card["task"] == "multiclass":
        # A 5-class model's road pixels are a legitimate coarse map for the binary road task.
        ids = (ids == DUBAI_ROAD_ID).astype(np.uint8)
    return ids


def train_refiner(data: Path, out: Path, coarse_model: Path, oof: list[tuple[Path, list[str]]], epochs: float,
                  minutes: float | None, batch: int, crop: int, lr: float, device_name: str, seed: int) -> dict:
    torch.manual_seed(seed)
    device = select_device(device_name)
    coarse_tensors, card = load_checkpoint(coarse_model)
    task = card["task"]
    tiles = card["training"]["coarse"]["tiles"]
    scenes = load_scenes(data, tiles, task)
    # Real coarse maps: out-of-fold where fold models are given (each scene predicted by a model that never saw
    # its tile), else the coarse model's own predictions, whose boundary errors are still those of a real CNN.
    fold_bundles = {path: build_bundle(*load_checkpoint(path), device, path) for path, _ in oof}
    oof_by_tile = {tile: fold_bundles[path] for path, fold_tiles in oof for tile in fold_tiles}
    own = build_bundle(coarse_tensors, card, device, coarse_model) if len(oof_by_tile) < len(tiles) else None
    for scene in scenes:
        scene.extra = predict_scene(oof_by_tile.get(scene.name.split("/")[0], own), scene, task)
    with_oof = sum(scene.name.split("/")[0] in oof_by_tile for scene in scenes)
    _log(f"refiner: {len(scenes)} scenes, {with_oof} with out-of-fold coarse maps, the rest the model's own")
    mean, std = card["normalization"]["mean"], card["normalization"]["std"]
    config = RefinerConfig(num_classes=card["num_classes"])
    model = Refiner(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    iterations = _iterations(scenes, crop, batch, epochs)
    schedule = Schedule(optimizer, lr, iterations, minutes)
    sampler = CropSampler(scenes, crop, seed=seed + 1)
    generator = torch.Generator().manual_seed(seed)
    k = card["num_classes"]
    model.train()
    iteration, running, started = 0, 0.0, time.monotonic()
    state = {"iteration": 0, "loss": 0.0, "started": started}
    meta = {"tiles": tiles, "batch": batch, "crop": crop, "lr": lr, "seed": seed, "device": str(device)}
    save = _refiner_saver(out, card, coarse_tensors, model, config, oof, meta, state)
    last_save = started
    while schedule.step(iteration):
        images, labels, real_ids = sampler.sample(batch)
        synthetic = random_degradation(labels, k, generator)
        # Half real coarse maps, half synthetic boundary errors. Real maps of the training tiles are cleaner
        # than on unseen imagery, so half of the time they are degraded further. No class weights here: the
        # coarse model's are already in its maps, and weighting again made the refiner widen roads.
        use_real = (torch.rand(batch, generator=generator) < 0.5)[:, None, None]
        if torch.rand(1, generator=generator).item() < 0.5:
            real_ids = random_degradation(real_ids, k, generator)
        coarse = torch.where(use_real, real_ids, synthetic).clamp(0, k - 1)
        images = normalize(images, mean, std).to(device)
        with _autocast(device):
            loss = model.loss(images, coarse.to(device), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running = 0.98 * running + 0.02 * loss.item() if iteration else loss.item()
        iteration += 1
        state.update(iteration=iteration, loss=running)
        if iteration % 50 == 0:
            _log(f"refiner it {iteration} loss {running:.4f} {time.monotonic() - started:.0f}s")
        if time.monotonic() - last_save > 600:  # a usable checkpoint survives an interrupted run
            save()
            last_save = time.monotonic()
    save()
    return card


def _refiner_saver(out: Path, card: dict, coarse_tensors: dict, model: torch.nn.Module, config: RefinerConfig,
                   oof: list, meta: dict, state: dict):
    def save() -> None:
        card["name"] = out.stem
        card["architecture"]["refiner"] = config.to_dict()
        card["parts"] = ["coarse", "refiner"]
        card["training"]["refiner"] = {
            **meta, "out_of_fold_models": {p.name: t for p, t in oof}, "iterations": state["iteration"],
            "minutes": round((time.monotonic() - state["started"]) / 60, 1), "final_loss": round(state["loss"], 4),
            "coarse_sources": "50% real coarse predictions (out-of-fold where fold models were given, else the "
                              "coarse model's own), 50% synthetic boundary degradations (blocky, smooth, jitter, "
                              "erode/dilate, small spurious blobs)",
        }
        tensors = dict(coarse_tensors)
        tensors.update({f"refiner.{name}": v for name, v in model.state_dict().items()})
        save_checkpoint(out, tensors, card)
        _log(f"wrote {out} at iteration {state['iteration']}")

    return save


def _parse_oof(values: list[str]) -> list[tuple[Path, list[str]]]:
    folds = []
    for value in values:
        path, _, tiles = value.rpartition(":")
        if not path or not tiles:
            raise IdgbrError(f"--oof expects MODEL:TILE,TILE (got {value!r})")
        folds.append((Path(path), tiles.split(",")))
    return folds


def _run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    common = dict(epochs=args.epochs, minutes=args.minutes, batch=args.batch, crop=args.crop, lr=args.lr,
                  device_name=args.device, seed=args.seed)
    if args.stage == "coarse":
        train_coarse(args.data, args.output, args.tiles.split(","), args.task, architecture=args.architecture,
                     **common)
    else:
        if not args.coarse_model:
            raise IdgbrError("idgbr train refiner needs --coarse-model (a file from 'idgbr train coarse').")
        train_refiner(args.data, args.output, args.coarse_model, _parse_oof(args.oof), **common)
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train the coarse segmenter or the refiner on the Dubai data")
    parser.add_argument("stage", choices=["coarse", "refiner"], help="which part to train")
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/dubai-aerial"),
                        help="the dubai-aerial folder (tileN/images/*.jpg and tileN/masks/*.png)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="model file to write (.safetensors)")
    parser.add_argument("--task", choices=["multiclass", "binary"], default="multiclass",
                        help="coarse only: 5 land-cover classes, or binary road vs. rest")
    parser.add_argument("--architecture", choices=["encoder-decoder", FCN_KIND], default="encoder-decoder",
                        help="coarse only: the bundled encoder-decoder CNN, or a plain FCN (a second, different "
                             "discriminative model, used to validate the refiner on other models' maps)")
    parser.add_argument("--tiles", default="tile1,tile2,tile3,tile4,tile5,tile6",
                        help="coarse only: training tiles (tile8 is held out for validation)")
    parser.add_argument("--coarse-model", type=Path, help="refiner only: the trained coarse model file")
    parser.add_argument("--oof", action="append", default=[], metavar="MODEL:TILES",
                        help="refiner only: a fold coarse model and the tiles it never saw (repeatable); "
                             "other tiles use the coarse model's own predictions")
    parser.add_argument("--epochs", type=float, default=30.0, help="passes over the training pixels")
    parser.add_argument("--minutes", type=float, default=None, help="wall-clock budget; ends training early")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=256, help="training crop size in pixels (multiple of 16)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (CUDA uses bfloat16 autocast)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    parser.set_defaults(func=_run)


def main(argv: list[str] | None = None) -> int:
    """`python -m idgbr.train coarse|refiner ...`, the same as `idgbr train ...`."""
    parser = argparse.ArgumentParser(prog="python -m idgbr.train")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
