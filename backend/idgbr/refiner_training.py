"""Training of the refiner (`idgbr train refiner`): long, resumable runs on the maps of many models.

What the refiner sees, so that it learns *repair* rather than one model's habits:
- real coarse maps of several discriminative models (every ``--coarse-source``, and a pixel classifier with
  ``--pixel-classifier``), half of the time degraded further;
- synthetic errors of the truth across scales (``degrade.random_degradation``);
- crops at 0.5x to 2.5x scale, plus strong photometric changes, and for binary tasks the Accra drone tiles
  at two resolutions beside the Dubai ones: a new sensor must not look like a new world.

Runs are resumable: every ``--save-minutes`` the full training state (weights, their moving average,
optimizer, random generators, position in the schedule) goes to ``OUTPUT.state.pt`` and the model file
is rewritten with the averaged weights. ``--resume`` continues from the state; a resumed run gives the same
weights as an uninterrupted run of the same length. Where the state is gone (another machine), ``--resume
--warm-start MODEL`` continues from a model file's refiner and its recorded place in the schedule. The
learning rate follows ``--iterations`` (the whole run, over any number of sessions); ``--minutes`` and
``--session-iterations`` only end this run's part of it. ``--init-from MODEL`` starts a new run (its own
schedule) from the layers that a model file's refiner shares with this run's design, say a half-resolution
refiner from a trained full-resolution one: most of the CG net's pyramid carries over.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, TypedDict

import numpy as np
import torch

from .card import ModelCard, Sampler
from .checkpoint import load_checkpoint, save_checkpoint, split_state
from .data import BINARY_TASKS, CropSampler, Scene, load_accra, load_scenes, normalize
from .degrade import MILD_SHARE, random_degradation
from .errors import IdgbrError
from .model_bundle import build_bundle, select_device
from .models.refiner import Refiner, RefinerConfig
from .precision import cpu_has_bf16

STATE_SUFFIX = ".state.pt"
EMA_DECAY = 0.998
TRAIN_BAND = 16  # the rules' radius in training: at least the widest band validation may choose
# Sampler defaults of a freshly trained refiner, until validation (`python -m idgbr.validate`) picks its own.
DEFAULT_SAMPLER = Sampler(band=8, vocabulary=8, min_confidence=0.5)


@dataclass
class RefinerRun:
    data: Path
    output: Path
    coarse_model: Path  # supplies the card (classes, normalisation) and the coarse part of the bundle
    coarse_sources: list[Path] = field(default_factory=list)  # further models whose maps are training inputs
    accra: Path | None = None  # binary tasks: the accra-buildings folder
    tiles: list[str] = field(default_factory=lambda: [f"tile{i}" for i in range(1, 7)])
    task: str | None = None  # binary models: "roads" or "buildings" trains a refiner of that foreground only;
    # None trains one refiner for both foregrounds
    pixel_classifier: bool = False
    iterations: int = 6000
    minutes: float | None = None  # this run's wall-clock budget (the schedule follows ``iterations``)
    session_iterations: int | None = None  # at most this many iterations in this run
    save_minutes: float = 5.0
    batch: int = 8
    crop: int = 256
    lr: float = 1e-3
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0
    resume: bool = False
    warm_start: Path | None = None  # continue from a model file's refiner when no training state exists
    real_share: float = 0.4  # share of crops whose coarse map is a real model's prediction
    resolution: int = 1  # the refiner networks' finest level: 1 full, 2 half (RefinerConfig.half_resolution)
    dubai_share: float | None = None  # with ``accra``: share of crops from the Dubai scenes (None: by area)
    init_from: Path | None = None  # a new run starts from the tensors it shares (name and shape) with this file


def autocast_for(device: torch.device, precision: str) -> tuple[contextlib.AbstractContextManager, str]:
    if precision not in ("auto", "fp32", "bf16"):
        raise IdgbrError(f"--precision must be auto, fp32 or bf16 (got {precision!r}).")
    use_bf16 = precision == "bf16" or (precision == "auto" and (device.type == "cuda" or cpu_has_bf16()))
    if not use_bf16:
        return contextlib.nullcontext(), "fp32"
    return torch.autocast(device.type, dtype=torch.bfloat16), "bf16"


def _coarse_only(path: Path, device: torch.device):
    """A model file's coarse segmenter alone (the refiner part, of any version, is not needed)."""
    tensors, card = load_checkpoint(path)
    card = dataclasses.replace(card, architecture={"coarse": card.architecture["coarse"]}, parts=["coarse"])
    return build_bundle({k: v for k, v in tensors.items() if k.startswith("coarse.")}, card, device, path)


def training_scenes(run: RefinerRun, card: ModelCard) -> list[Scene]:
    """Multiclass: the Dubai tiles. Binary: the Dubai tiles as road scenes and/or building scenes (``run.task``),
    and for buildings with ``accra`` the Accra drone tiles at ~0.2 and ~0.1 m; each scene remembers its
    foreground class."""
    if card.task == "multiclass":
        return load_scenes(run.data, run.tiles, "multiclass")
    if run.task not in (None, "roads", "buildings"):
        raise IdgbrError(f"--task {run.task} is not a refiner task of a binary model; give roads or buildings, "
                         "or leave it out to train one refiner for both.")
    tasks = ("roads", "buildings") if run.task is None else (run.task,)
    scenes = []
    for task in tasks:
        for scene in load_scenes(run.data, run.tiles, task):
            scene.foreground = BINARY_TASKS[task]
            scenes.append(scene)
    if run.accra is not None and "buildings" in tasks:
        for scene in load_accra(run.accra, "train", 4) + load_accra(run.accra, "train", 2):
            scene.foreground = BINARY_TASKS["buildings"]
            scenes.append(scene)
    return scenes


def scene_weights(scenes: list[Scene], dubai_share: float | None) -> np.ndarray:
    """How often each scene is drawn: by area, or with ``dubai_share`` the Dubai scenes together that share of
    the crops and the Accra tiles the rest (by area within each group). By area, Accra's 143 MP outweigh
    Dubai's 37 MP of building scenes four to one, and the refiner learns mostly one sensor."""
    areas = np.array([s.labels.size for s in scenes], dtype=np.float64)
    if dubai_share is None:
        return areas / areas.sum()
    if not 0.0 < dubai_share < 1.0:
        raise IdgbrError(f"--dubai-share must lie between 0 and 1 (got {dubai_share}).")
    accra = np.array([s.name.startswith("accra/") for s in scenes])
    if accra.all() or not accra.any():
        raise IdgbrError("--dubai-share needs both Dubai scenes and Accra tiles: give --accra with a building "
                         "task, or leave --dubai-share out.")
    dubai_part = np.where(accra, 0.0, areas) / areas[~accra].sum() * dubai_share
    accra_part = np.where(accra, areas, 0.0) / areas[accra].sum() * (1.0 - dubai_share)
    return dubai_part + accra_part


def attach_real_maps(run: RefinerRun, card: ModelCard, scenes: list[Scene], device: torch.device) -> list[str]:
    """Predict every scene with every coarse source; scenes carry them as extra (S, H, W). Returns names.

    A binary refiner of both foregrounds (roads, buildings) takes its real maps from multiclass sources only
    (the scene's foreground class against the rest), as a binary source knows one foreground; a refiner of
    one foreground (``run.task``) also learns from binary models of it."""
    from .train import predict_scene

    binary = card.task != "multiclass"
    mixed = binary and run.task is None
    names: list[str] = []
    maps: list[list[np.ndarray]] = [[] for _ in scenes]
    for path in [run.coarse_model, *run.coarse_sources]:
        bundle = _coarse_only(path, device)
        if mixed and bundle.card.task != "multiclass":
            print(f"{path.name}: a binary model of one foreground; not a source for this refiner", flush=True)
            continue
        for i, scene in enumerate(scenes):
            maps[i].append(predict_scene(bundle, scene, card.task, scene.foreground))
        names.append(path.stem)
    if run.pixel_classifier and not mixed:
        from .classical import PixelClassifier

        try:
            import sklearn  # noqa: F401
        except ImportError as exc:
            raise IdgbrError("--pixel-classifier needs scikit-learn in the backend: pip install scikit-learn "
                             "(make install does), or leave the option out.") from exc
        classifier = PixelClassifier(seed=run.seed).fit([s.image for s in scenes], [s.labels for s in scenes])
        for i, scene in enumerate(scenes):
            maps[i].append(classifier.predict(scene.image))
        names.append("pixel classifier")
    if names:
        for scene, scene_maps in zip(scenes, maps):
            scene.extra = np.stack(scene_maps)
    return names


class EMA:
    """Moving average of the weights: the shipped weights, steadier than the last iteration's."""

    def __init__(self, model: torch.nn.Module, decay: float = EMA_DECAY) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for avg, new in zip(self.model.state_dict().values(), model.state_dict().values()):
            if avg.dtype.is_floating_point:
                avg.mul_(self.decay).add_(new.detach(), alpha=1 - self.decay)
            else:
                avg.copy_(new)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """Ctrl-C or SIGTERM ends the run after the current iteration, with the state saved (resumable)."""
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGINT, signal.SIGTERM):
            previous[number] = signal.signal(number, lambda *_: stop.set())
    try:
        yield stop
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


class TrainingProgress(TypedDict):
    """How far a refiner run got: saved in its training state and summarised on the model card."""

    iteration: int
    seconds: float
    loss: float
    sessions: int


def _load_same_design(model: Refiner, weights: dict, source: Path, resolution: int) -> None:
    """Load weights to continue from, or name the design mismatch (say, another --refiner-resolution)."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise IdgbrError(f"{source} holds a refiner of another design than --refiner-resolution {resolution} "
                         "builds: give the --refiner-resolution it was trained with, or start a new run.") from exc


def shared_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of ``weights`` that ``model`` has under the same name and with the same shape."""
    own = model.state_dict()
    return {name: tensor for name, tensor in weights.items() if name in own and own[name].shape == tensor.shape}


def _refiner_in(source: Path, k: int, option: str, purpose: str) -> tuple[dict[str, torch.Tensor], ModelCard]:
    """The refiner weights and card of a model file given as ``option``, which must hold a ``k``-class refiner."""
    tensors, card = load_checkpoint(source)
    weights = split_state(tensors, "refiner.")
    if not weights or card.num_classes != k:
        raise IdgbrError(f"{option} {source} has no {k}-class refiner to {purpose}.")
    return weights, card


def _init_from(model: Refiner, source: Path, k: int) -> dict:
    """Load the tensors ``model`` shares with ``source``'s refiner; returns what the card records of it."""
    weights, card = _refiner_in(source, k, "--init-from", "start from")
    shared = shared_weights(model, weights)
    if not shared:
        raise IdgbrError(f"--init-from {source}: its refiner shares no layer with this design; start without it.")
    total = sum(v.numel() for v in model.state_dict().values())
    carried = sum(v.numel() for v in shared.values())
    model.load_state_dict(shared, strict=False)
    print(f"initialised {carried / total:.0%} of the refiner's parameters from {source}", flush=True)
    return {"model": card.name, "share_of_parameters": round(carried / total, 3),
            "iterations": card.training.get("refiner", {}).get("iterations")}


def recorded_stages(iterations: int, precision: str | None, dubai_share: float | None = None,
                    scheduled_iterations: int | None = None) -> list[dict]:
    """The stages of a run recorded before stages were: one stage of what its card (or state) said."""
    if iterations <= 0:
        return []
    known = {"precision": precision, "dubai_share": dubai_share, "scheduled_iterations": scheduled_iterations}
    return [{"iterations": [0, iterations], **{k: v for k, v in known.items() if v not in (None, "")}}]


def continue_stages(stages: list[dict], iteration: int, settings: dict) -> list[dict]:
    """The stages with this session's ``settings`` added: the last stage goes on when they are its own, else a new
    one starts at ``iteration``. A card's single precision or share tells only of the latest session."""
    if stages and all(stages[-1].get(key) == value for key, value in settings.items()):
        return stages
    return [*stages, {"iterations": [iteration, iteration], **settings}]


def precision_history(stages: list[dict]) -> str:
    """The precisions the stages ran at, in order, each change once: "fp32 then bf16"."""
    changes: list[str] = []
    for stage in stages:
        for precision in str(stage.get("precision") or "").split(" then "):
            if precision and (not changes or changes[-1] != precision):
                changes.append(precision)
    return " then ".join(changes)


def learning_rate(run: RefinerRun, iteration: int, warm_from: int = 0) -> float:
    warmup = min(1.0, (iteration - warm_from + 1) / 200)
    return run.lr * warmup * 0.5 * (1 + math.cos(math.pi * min(1.0, iteration / run.iterations)))


def make_batch(run: RefinerRun, sampler: CropSampler, generator: torch.Generator, k: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images, labels, real = sampler.sample(run.batch)
    coarse = random_degradation(labels, k, generator)
    if real is not None:
        use_real = (torch.rand(run.batch, generator=generator) < run.real_share)[:, None, None]
        if torch.rand(1, generator=generator).item() < 0.5:
            real = random_degradation(real, k, generator)
        coarse = torch.where(use_real, real, coarse)
    return images, labels, coarse.clamp(0, k - 1)


def train_refiner(run: RefinerRun) -> ModelCard:
    device = select_device(run.device)
    torch.manual_seed(run.seed)
    coarse_tensors, card = load_checkpoint(run.coarse_model)
    card = copy.deepcopy(card)
    card.sampler, card.metrics = copy.deepcopy(DEFAULT_SAMPLER), {}
    card.training.pop("refiner", None)
    k = card.num_classes
    scenes = training_scenes(run, card)
    source_names = attach_real_maps(run, card, scenes, device)
    mean, std = card.normalization.mean, card.normalization.std
    print(f"refiner: {len(scenes)} scenes ({sum(s.labels.size for s in scenes) / 1e6:.0f} MP), real maps of "
          f"{', '.join(source_names)}", flush=True)

    if run.resolution not in (1, 2):
        raise IdgbrError(f"--refiner-resolution must be 1 (full) or 2 (half), got {run.resolution}.")
    config = RefinerConfig(in_channels=len(mean), num_classes=k) if run.resolution == 1 else \
        RefinerConfig.half_resolution(len(mean), k)
    model = Refiner(config).to(device)
    ema = EMA(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=run.lr, weight_decay=1e-4)
    sampler = CropSampler(scenes, run.crop, scale_range=(0.5, 2.5), seed=run.seed + 1, strong_photometric=True,
                          weights=scene_weights(scenes, run.dubai_share))
    generator = torch.Generator().manual_seed(run.seed)
    autocast, precision = autocast_for(device, run.precision)
    state_path = run.output.with_name(run.output.name + STATE_SUFFIX)
    progress: TrainingProgress = {"iteration": 0, "seconds": 0.0, "loss": 0.0, "sessions": 0}
    warm_from = 0
    initialised: dict | None = None  # the model a run started from with --init-from, kept over its sessions
    stages: list[dict] = []  # which iterations ran with which settings (a run may move to a bf16 machine)
    if run.resume and not state_path.is_file() and run.warm_start is None:
        raise IdgbrError(f"--resume: no training state at {state_path}; start without --resume, or give "
                         "--warm-start MODEL to continue from a model file's refiner.")
    if run.resume and state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=False)
        _load_same_design(model, state["model"], state_path, run.resolution)
        ema.model.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.rng.bit_generator.state = state["sampler_rng"]
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        progress.update(state["progress"])
        warm_from = state.get("warm_from", 0)  # a warm start's warm-up goes on where it stopped
        initialised = state.get("initialised_from")
        # A state from before stages were recorded knows only its precisions.
        legacy_precision = " then ".join(state.get("precisions", ()))
        stages = state.get("stages") or recorded_stages(progress["iteration"], legacy_precision)
        print(f"resumed at iteration {progress['iteration']} ({progress['seconds'] / 3600:.2f} h so far)", flush=True)
    elif run.warm_start is not None:
        # A model file keeps the averaged weights and how far its schedule went, not the optimizer: the run
        # continues the schedule from there with a fresh optimizer (after a short warm-up).
        weights, warm_card = _refiner_in(run.warm_start, k, "--warm-start", "continue from")
        _load_same_design(model, weights, run.warm_start, run.resolution)
        ema.model.load_state_dict(weights)
        done = warm_card.training.get("refiner", {})
        progress.update({"iteration": int(done.get("iterations", 0)), "seconds": float(done.get("hours", 0)) * 3600,
                         "sessions": int(done.get("sessions", 0)), "loss": float(done.get("final_loss", 0.0))})
        warm_from = progress["iteration"]
        initialised = done.get("initialised_from")
        stages = done.get("stages") or recorded_stages(progress["iteration"], done.get("precision"),
                                                       done.get("dubai_share"), done.get("scheduled_iterations"))
        print(f"warm start from {run.warm_start} at iteration {warm_from}", flush=True)
    if run.init_from is not None:
        if run.resume or run.warm_start is not None:
            raise IdgbrError("--init-from starts a new run: drop --resume and --warm-start, or drop --init-from.")
        initialised = _init_from(model, run.init_from, k)
        ema.model.load_state_dict(model.state_dict())
    if progress["iteration"] < run.iterations:  # resuming a finished schedule adds no session and no stage
        progress["sessions"] += 1
        stages = continue_stages(stages, progress["iteration"], {
            "precision": precision, "dubai_share": run.dubai_share, "scheduled_iterations": run.iterations})

    meta = {"tiles": run.tiles, "accra": run.accra is not None, "foreground": run.task or "all",
            "dubai_share": run.dubai_share,
            "batch": run.batch, "crop": run.crop,
            "lr": run.lr, "seed": run.seed, "device": str(device), "precision": precision_history(stages),
            "scheduled_iterations": run.iterations, "train_band": TRAIN_BAND,
            "weights": f"moving average (decay {EMA_DECAY})",
            "coarse_sources": source_names,
            "synthetic_errors": "blocky 4-32 px, smoothing, warp 2-16 px, shift 2-12 px, erosion/dilation, "
                                f"lost thin structures, spurious blobs (1-3 at once); {MILD_SHARE:.0%} of batches "
                                "only a mild warp of 2-5 px",
            "augmentation": "scale 0.5-2.5x (log-uniform), rotations, flips, strong photometric"}
    if initialised:
        meta["initialised_from"] = initialised

    def save() -> None:
        card.name = run.output.stem
        card.architecture["refiner"] = config.to_dict()
        card.parts = ["coarse", "refiner"] if "coarse" in card.architecture else ["refiner"]
        if stages:
            stages[-1]["iterations"][1] = progress["iteration"]
        card.training["refiner"] = {**meta, "stages": stages, "iterations": progress["iteration"],
                                    "hours": round(progress["seconds"] / 3600, 2),
                                    "sessions": progress["sessions"], "final_loss": round(progress["loss"], 4)}
        tensors = {f"coarse.{n}": v for n, v in split_state(coarse_tensors, "coarse.").items()}
        tensors.update({f"refiner.{n}": v for n, v in ema.model.state_dict().items()})
        save_checkpoint(run.output, tensors, card)
        state = {"model": model.state_dict(), "ema": ema.model.state_dict(), "optimizer": optimizer.state_dict(),
                 "sampler_rng": sampler.rng.bit_generator.state, "generator": generator.get_state(),
                 "torch_rng": torch.get_rng_state(), "progress": dict(progress), "warm_from": warm_from,
                 "initialised_from": initialised, "stages": stages}
        tmp = state_path.with_name(state_path.name + ".tmp")
        torch.save(state, tmp)
        tmp.replace(state_path)
        print(f"saved {run.output} and its training state at iteration {progress['iteration']}", flush=True)

    with _stop_on_signals() as stop_requested:
        model.train()
        session_start = last_save = time.monotonic()
        tick = time.monotonic()
        stop = run.iterations if run.session_iterations is None else min(
            run.iterations, progress["iteration"] + run.session_iterations)
        while progress["iteration"] < stop:
            if run.minutes is not None and time.monotonic() - session_start >= run.minutes * 60:
                break
            if stop_requested.is_set():
                print("stopping on request; the run can be resumed with --resume", flush=True)
                break
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(run, progress["iteration"], warm_from)
            images, labels, coarse = make_batch(run, sampler, generator, k)
            images = normalize(images, mean, std).to(device)
            with autocast:
                loss = model.loss(images, coarse.to(device), labels.to(device), TRAIN_BAND, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            ema.update(model)
            now = time.monotonic()
            progress["seconds"] += now - tick
            tick = now
            progress["loss"] = 0.98 * progress["loss"] + 0.02 * loss.item() if progress["iteration"] else loss.item()
            progress["iteration"] += 1
            if progress["iteration"] % 50 == 0:
                print(f"refiner it {progress['iteration']} loss {progress['loss']:.4f} "
                      f"{progress['seconds'] / 3600:.2f} h", flush=True)
            if now - last_save > run.save_minutes * 60:
                save()
                last_save = time.monotonic()
    save()
    return card
