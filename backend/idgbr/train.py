"""Training of the coarse segmenter and of the refiner (`idgbr train coarse|refiner`)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .card import DEFAULT_TILE, ClassEntry, ModelCard, Normalization, Sampler
from .checkpoint import load_checkpoint, save_checkpoint, split_state
from .classes import BUILDING_CLASSES, DUBAI_CLASSES, DUBAI_ROAD_ID, IGNORE_ID, ROAD_CLASSES
from .data import CropSampler, Scene, channel_stats, load_accra, load_scenes, normalize
from .errors import IdgbrError
from .model_bundle import ModelBundle, build_coarse, select_device
from .models.coarse import CoarseConfig
from .models.fcn import FCN_KIND, FcnConfig
from .refiner_training import RefinerRun, autocast_for, train_refiner

# Building models see Accra at ~0.2 and ~0.4 m and Dubai at ~0.5 m, scaled by 0.6-1.7 in training: valid from
# about 0.12 to 0.68 m. They work at 0.15 m: on the selection third of Accra val/ their maps are best there
# (mIoU falls as the pixels grow from 0.15 to 0.4 m), so a drone mosaic is segmented at 0.15 m while Dubai's
# 0.5 m stays as it is.
ACCRA_WORKING_M = 0.15
ACCRA_RANGE_M = (0.12, 0.6)


def base_card(name: str, task: str, mean: list[float], std: list[float], pixel_size_m: float = 0.5) -> ModelCard:
    """The card of a new coarse model (no architecture yet); ``task``: "multiclass", or a binary task
    ("binary"/"roads": road vs. rest, "buildings"). The sampler keeps its defaults until a refiner is trained
    and `python -m idgbr.validate` chooses them per model."""
    classes = {"multiclass": DUBAI_CLASSES, "buildings": BUILDING_CLASSES}.get(task, ROAD_CLASSES)
    return ModelCard(
        name=name,
        task="multiclass" if task == "multiclass" else "binary",
        num_classes=len(classes),
        classes=[ClassEntry(c.id, c.name, c.color) for c in classes],
        bands=["red", "green", "blue"],
        bands_default=[1, 2, 3],
        normalization=Normalization(mean, std, "8-bit digital numbers"),
        tile_size=DEFAULT_TILE,
        overlap=64,
        size_multiple=16,
        # The Dubai imagery states no ground sample distance; 0.5 m is the nominal value we assume.
        pixel_size_m=pixel_size_m,
        sampler=Sampler(),
        architecture={},
    )


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


REFINER_ITERATIONS = 6000


def _log(message: str) -> None:
    print(message, flush=True)


def train_coarse(data: Path, out: Path, tiles: list[str], task: str, epochs: float, minutes: float | None,
                 batch: int, crop: int, lr: float, device_name: str, seed: int, architecture: str = "encoder-decoder",
                 accra: Path | None = None, warm_start: Path | None = None,
                 iterations: int | None = None) -> ModelCard:
    """Train a coarse segmenter; ``warm_start``: continue from that model file's segmenter (same architecture)
    with a fresh optimizer and schedule, its earlier training kept in the card. ``iterations``, when given,
    replaces ``epochs`` as the schedule's length: the same model on any machine, unlike ``minutes``."""
    torch.manual_seed(seed)
    device = select_device(device_name)
    scenes = load_scenes(data, tiles, task)
    # Normalisation from the Dubai tiles for every model, so that one refiner can serve several of them.
    mean, std = channel_stats(scenes)
    pixel_size = 0.5
    if accra is not None:
        # Drone tiles at ~0.2 and ~0.4 m beside the Dubai tiles at ~0.5 m.
        scenes += load_accra(accra, "train", 4) + load_accra(accra, "train", 8)
        pixel_size = ACCRA_WORKING_M
    card = base_card(out.stem, task, mean, std, pixel_size)
    if accra is not None:
        card.pixel_size_range_m = list(ACCRA_RANGE_M)
    config = (FcnConfig if architecture == FCN_KIND else CoarseConfig)(num_classes=card.num_classes)
    model = build_coarse(config.to_dict()).to(device)
    earlier: list[dict] = []
    if warm_start is not None:
        earlier = _warm_start_coarse(model, warm_start, config.to_dict())
        _log(f"warm start from {warm_start}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    if iterations is None:
        iterations = _iterations(scenes, crop, batch, epochs)
    schedule = Schedule(optimizer, lr, iterations, minutes)
    sampler = CropSampler(scenes, crop, scale_range=(0.6, 1.7) if accra else (0.75, 1.33), seed=seed,
                          strong_photometric=accra is not None)
    autocast, precision = autocast_for(device, "auto")
    class_weight = inverse_sqrt_frequency(scenes, card.num_classes).to(device)
    model.train()
    iteration, running, started = 0, 0.0, time.monotonic()
    while schedule.step(iteration):
        images, labels, _ = sampler.sample(batch)
        images = normalize(images, mean, std).to(device)
        labels = labels.to(device)
        with autocast:
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, weight=class_weight, ignore_index=IGNORE_ID)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running = 0.98 * running + 0.02 * loss.item() if iteration else loss.item()
        iteration += 1
        if iteration % 50 == 0:
            _log(f"coarse it {iteration} loss {running:.4f} {time.monotonic() - started:.0f}s")
    card.architecture["coarse"] = config.to_dict()
    card.parts = ["coarse"]
    card.training["coarse"] = {
        "tiles": tiles, "accra": accra is not None, "precision": precision,
        "iterations": iteration, "batch": batch, "crop": crop, "lr": lr, "seed": seed,
        "minutes": round((time.monotonic() - started) / 60, 1), "device": str(device), "final_loss": round(running, 4),
    }
    if earlier:
        card.training["coarse"]["earlier"] = earlier  # the runs this one continued, oldest first
    save_checkpoint(out, {f"coarse.{k}": v for k, v in model.state_dict().items()}, card)
    _log(f"wrote {out}")
    return card


def _warm_start_coarse(model: torch.nn.Module, source: Path, config: dict) -> list[dict]:
    """Load ``source``'s coarse weights into ``model``; returns its training records (oldest first)."""
    tensors, card = load_checkpoint(source)
    if card.architecture.get("coarse") != json.loads(json.dumps(config)):  # as stored: tuples become lists
        raise IdgbrError(f"--warm-start {source} holds another coarse segmenter than this run builds; give the "
                         "--task and --architecture it was trained with.")
    model.load_state_dict(split_state(tensors, "coarse."))
    record = dict(card.training.get("coarse", {}))
    earlier = record.pop("earlier", [])
    return [*earlier, record]


@torch.inference_mode()
def pad_to_multiple(tensor: torch.Tensor, multiple: int) -> tuple[torch.Tensor, int, int]:
    """Reflect-pad the last two dims up to a multiple of ``multiple``; also returns the original size."""
    height, width = tensor.shape[-2:]
    return F.pad(tensor, (0, (-width) % multiple, 0, (-height) % multiple), mode="reflect"), height, width


def predict_scene(bundle: ModelBundle, scene: Scene, task: str, foreground: int | None = None) -> np.ndarray:
    """Coarse ids of a whole scene with a coarse model. For a binary ``task`` a multiclass model's
    ``foreground`` class (default: road) against the rest is a legitimate coarse map."""
    card = bundle.card
    image, height, width = pad_to_multiple(bundle.normalize(scene.image.transpose(2, 0, 1)), card.size_multiple)
    ids = bundle.segment(image)[0, :, :height, :width].argmax(0).byte().cpu().numpy()
    if task != "multiclass" and card.task == "multiclass":
        ids = (ids == (DUBAI_ROAD_ID if foreground is None else foreground)).astype(np.uint8)
    return ids


def _run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    common = dict(epochs=args.epochs, minutes=args.minutes, batch=args.batch, crop=args.crop,
                  lr=args.lr if args.lr is not None else 2e-3, device_name=args.device, seed=args.seed)
    if args.stage == "coarse":
        train_coarse(args.data, args.output, args.tiles.split(","), args.task, architecture=args.architecture,
                     accra=args.accra, warm_start=args.warm_start, iterations=args.iterations, **common)
    else:
        if not args.coarse_model:
            raise IdgbrError("idgbr train refiner needs --coarse-model (a file from 'idgbr train coarse').")
        train_refiner(RefinerRun(
            data=args.data, output=args.output, coarse_model=args.coarse_model, coarse_sources=args.coarse_source,
            accra=args.accra, tiles=args.tiles.split(","), pixel_classifier=args.pixel_classifier,
            task=args.task if args.task in ("roads", "buildings") else None,
            iterations=args.iterations or REFINER_ITERATIONS, minutes=args.minutes,
            session_iterations=args.session_iterations,
            save_minutes=args.save_minutes, batch=args.batch,
            crop=args.crop, lr=args.lr if args.lr is not None else 1e-3, device=args.device,
            precision=args.precision, seed=args.seed, resume=args.resume, warm_start=args.warm_start,
            dubai_share=args.dubai_share, resolution=args.refiner_resolution, init_from=args.init_from))
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train the coarse segmenter or the refiner on the Dubai data")
    parser.add_argument("stage", choices=["coarse", "refiner"], help="which part to train")
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/dubai-aerial"),
                        help="the dubai-aerial folder (tileN/images/*.jpg and tileN/masks/*.png)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="model file to write (.safetensors)")
    parser.add_argument("--task", choices=["multiclass", "binary", "roads", "buildings"], default="multiclass",
                        help="coarse: 5 land-cover classes, or binary road (binary, roads) or building vs. rest; "
                             "refiner of a binary model: roads or buildings trains it for that foreground only "
                             "(default: one refiner for both)")
    parser.add_argument("--architecture", choices=["encoder-decoder", FCN_KIND], default="encoder-decoder",
                        help="coarse only: the bundled encoder-decoder CNN, or a plain FCN (a second, different "
                             "discriminative model, used to validate the refiner on other models' maps)")
    parser.add_argument("--tiles", default="tile1,tile2,tile3,tile4,tile5,tile6",
                        help="coarse only: training tiles (tile8 is held out for validation)")
    parser.add_argument("--coarse-model", type=Path, help="refiner only: the trained coarse model file")
    parser.add_argument("--coarse-source", action="append", default=[], type=Path, metavar="MODEL",
                        help="refiner only: another model file whose coarse maps of the training tiles are "
                             "training inputs (repeatable); the --coarse-model's own maps always are")
    parser.add_argument("--pixel-classifier", action="store_true",
                        help="refiner only (multiclass): also train on a gradient-boosted pixel classifier's maps")
    parser.add_argument("--accra", type=Path, default=None,
                        help="binary tasks: the accra-buildings folder; its drone tiles join the training")
    parser.add_argument("--refiner-resolution", type=int, choices=[1, 2], default=1,
                        help="refiner only: the networks' finest level, 1 = full resolution, 2 = half (pixel-unshuffle "
                             "in, pixel-shuffle out: cheaper on a CPU)")
    parser.add_argument("--dubai-share", type=float, default=None, metavar="FRACTION",
                        help="refiner with --accra: share of training crops from the Dubai scenes (default: by "
                             "area, about 0.2)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="length of the learning-rate schedule; refiner: of the whole run, over sessions "
                             f"(default {REFINER_ITERATIONS}); coarse: replaces --epochs")
    parser.add_argument("--session-iterations", type=int, default=None,
                        help="refiner only: end this run after this many iterations (resume later)")
    parser.add_argument("--save-minutes", type=float, default=5.0,
                        help="refiner only: write the model and the resumable training state this often")
    parser.add_argument("--resume", action="store_true",
                        help="refiner only: continue from OUTPUT.state.pt (written by an earlier run)")
    parser.add_argument("--warm-start", type=Path, default=None, metavar="MODEL",
                        help="coarse: continue from this model file's segmenter (a fresh optimizer and schedule); "
                             "refiner, with --resume: where OUTPUT.state.pt is missing, continue from this model "
                             "file's refiner (its averaged weights and recorded iterations; a fresh optimizer)")
    parser.add_argument("--init-from", type=Path, default=None, metavar="MODEL",
                        help="refiner only: start a new run from the layers this model file's refiner shares with "
                             "the design being trained (e.g. --refiner-resolution 2 from a full-resolution model)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="refiner only: bf16 autocast (auto: on CUDA and on CPUs with bf16 matrix units)")
    parser.add_argument("--epochs", type=float, default=30.0, help="passes over the training pixels")
    parser.add_argument("--minutes", type=float, default=None,
                        help="wall-clock budget of this run (a refiner run can be resumed later)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=256, help="training crop size in pixels (multiple of 16)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (coarse 2e-3, refiner 1e-3)")
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
