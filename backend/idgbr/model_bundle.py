"""A loaded model: coarse segmenter + refiner + card, ready for inference on a device."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import torch

from .card import CardLike, ModelCard, as_card
from .checkpoint import load_checkpoint, split_state
from .data import normalize
from .errors import IdgbrError
from .limits import DEFAULT_MODEL, MAX_STEPS, MIN_STEPS
from .models.coarse import CoarseConfig, CoarseNet
from .models.diffusion import position_noise
from .models.fcn import FCN_KIND, FcnConfig, FcnNet
from .models.refiner import Refiner, RefinerConfig
from .precision import autocast, resolve_precision


def models_dir() -> Path:
    """Bundled weights: $IDGBR_MODELS_DIR, else resources/models beside the backend folder
    (the repository root in a checkout, the plugin folder in the installed plugin)."""
    env = os.environ.get("IDGBR_MODELS_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "resources" / "models"


def default_model_path(name: str = DEFAULT_MODEL) -> Path:
    return models_dir() / f"{name}.safetensors"


def bundled_models() -> dict[str, Path]:
    folder = models_dir()
    return {p.stem: p for p in sorted(folder.glob("*.safetensors"))} if folder.is_dir() else {}


def resolve_model_path(model: str | Path | None) -> Path:
    """None -> the default bundled model; a bundled name (e.g. "roads2") -> its file; else a path."""
    if model is None or str(model) == "":
        return default_model_path()
    text = str(model)
    if not text.endswith(".safetensors") and (models_dir() / f"{text}.safetensors").is_file():
        return models_dir() / f"{text}.safetensors"
    return Path(text).expanduser()


def select_device(requested: str = "auto") -> torch.device:
    requested = (requested or "auto").lower()
    has_mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if has_mps else torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise IdgbrError(f"CUDA was requested but this backend's PyTorch ({torch.__version__}) cannot use a GPU "
                         f"({'no CUDA build' if torch.version.cuda is None else 'no CUDA device found'}). "
                         "Choose device 'auto' or 'cpu', or install a CUDA build of PyTorch in the backend.",
                         "device")
    if requested == "mps" and not has_mps:
        raise IdgbrError("Apple MPS was requested but is not available here. Choose device 'auto' or 'cpu'.",
                         "device")
    if requested not in ("cpu", "cuda", "mps"):
        raise IdgbrError(f"Unknown device {requested!r}: use auto, cpu, cuda or mps.", "device")
    return torch.device(requested)


class ModelBundle:
    """Inference wrapper. Images are (B, C, H, W) float32 normalised; H and W multiples of size_multiple."""

    def __init__(self, card: ModelCard, coarse: torch.nn.Module | None, refiner: Refiner | None, device: torch.device,
                 source: Path | None = None) -> None:
        self.card = card
        self.device = device
        self.source = source
        self.precision: str | None = None  # of calls that name none (None: the device's default)
        memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format
        self.memory_format = memory_format
        # torch's type stubs lack Module.to(memory_format=...), which PyTorch accepts.
        self.coarse = coarse.to(device, memory_format=memory_format).eval() if coarse else None  # type: ignore[call-overload]
        self.refiner = refiner.to(device, memory_format=memory_format).eval() if refiner else None  # type: ignore[call-overload]

    @property
    def num_classes(self) -> int:
        return self.card.num_classes

    def _autocast(self, precision: str | None) -> contextlib.AbstractContextManager:
        """The networks' autocast for ``precision`` (idgbr.precision; None: ``self.precision``)."""
        return autocast(resolve_precision(precision or self.precision, self.device), self.device)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        return self._to_device(images).contiguous(memory_format=self.memory_format)

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            # Page-locked host memory: the copy to the GPU then runs without a staging copy and without
            # blocking the host.
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def normalize(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Pixels in 8-bit units, (C, H, W) or (B, C, H, W) -> normalised float32 tensor on the CPU."""
        tensor = torch.as_tensor(np.asarray(pixels), dtype=torch.float32)
        if tensor.ndim == 3:
            tensor = tensor[None]
        norm = self.card.normalization
        return normalize(tensor, norm.mean, norm.std)

    @torch.inference_mode()
    def segment(self, images: torch.Tensor, precision: str | None = None) -> torch.Tensor:
        """Coarse class logits (B, K, H, W), float32 on the model's device; ``precision`` of the network: fp32,
        bf16, fp16, auto or None for the device's default (idgbr.precision)."""
        if self.coarse is None:
            raise IdgbrError("This model file has no coarse segmenter; give a coarse map (--coarse) instead.")
        with self._autocast(precision):
            return self.coarse(self._prepare(images)).float()

    @torch.inference_mode()
    def refine(self, images: torch.Tensor, coarse_ids: torch.Tensor, origins: list[tuple[int, int]], *,
               steps: int | None = None, seed: int | None = None, band: int | None = None,
               vocabulary: int | None = None, strength: float | None = None, precision: str | None = None
               ) -> torch.Tensor:
        """Refined class logits (B, K, H, W), float32, under the band and vocabulary rules (-1 = rule off);
        None takes the card's sampler default. ``precision`` is that of the networks (see ``segment``); the
        sampler's own arithmetic is float32."""
        if self.refiner is None:
            raise IdgbrError("This model file has no refiner; use segment mode or another model.")
        sampler = self.card.sampler
        steps = int(sampler.steps if steps is None else steps)
        seed = int(sampler.seed if seed is None else seed)
        band = int(sampler.band if band is None else band)
        vocabulary = int(sampler.vocabulary if vocabulary is None else vocabulary)
        strength = float(sampler.strength if strength is None else strength)
        if not MIN_STEPS <= steps <= MAX_STEPS:
            raise IdgbrError(f"steps must be between {MIN_STEPS} and {MAX_STEPS} (got {steps}).", "steps")
        batch, _, height, width = images.shape
        noise = torch.stack([position_noise(seed, origin, (self.num_classes, height, width), self.device)
                             for origin in origins[:batch]])
        with self._autocast(precision):
            logits = self.refiner.sample(self._prepare(images), self._to_device(coarse_ids), noise, steps,
                                         strength, band, vocabulary)
        return logits.float()

    def flops_per_megapixel(self, steps: int | None = None, refine: bool = True) -> float:
        """Floating-point operations per megapixel (coarse pass, plus the refine pass when ``refine``)."""
        from torch.utils.flop_counter import FlopCounterMode

        size = 256
        image = torch.zeros(1, self.card.channels, size, size)
        ids = torch.zeros(1, size, size, dtype=torch.long)
        ids[:, :, size // 2:] = 1
        counter = FlopCounterMode(display=False)
        with counter:
            if self.coarse is not None:
                self.segment(image)
            if refine and self.refiner is not None:
                self.refine(image, ids, [(0, 0)], steps=steps)
        return counter.get_total_flops() / (size * size / 1e6)


def build_coarse(spec: dict) -> torch.nn.Module:
    """The coarse network that a model card's architecture entry describes (encoder-decoder or FCN)."""
    if spec.get("kind") == FCN_KIND:
        return FcnNet(FcnConfig(**{**spec, "widths": tuple(spec["widths"])}))
    return CoarseNet(CoarseConfig(**{**spec, "widths": tuple(spec["widths"])}))


def build_bundle(tensors: dict[str, torch.Tensor], card: CardLike, device: torch.device,
                 source: Path | None = None) -> ModelBundle:
    card = as_card(card, source)  # checked again: the card may have been built or changed in memory
    arch = card.architecture
    coarse = refiner = None
    try:
        if "coarse" in arch:
            coarse = build_coarse(arch["coarse"])
            coarse.load_state_dict(split_state(tensors, "coarse."))
        if "refiner" in arch:
            refiner = Refiner(RefinerConfig.from_dict(arch["refiner"]))
            refiner.load_state_dict(split_state(tensors, "refiner."))
    except (RuntimeError, TypeError, KeyError, ValueError) as exc:
        raise IdgbrError(f"The weights in {source or 'the model file'} do not match its model card ({exc}). "
                         "The file is damaged or was edited; use the bundled model or retrain.") from exc
    if coarse is None and refiner is None:
        raise IdgbrError(f"{source or 'The model file'} holds neither a coarse segmenter nor a refiner.")
    return ModelBundle(card, coarse, refiner, device, source)


def load_bundle(path: str | Path | None = None, device: str = "auto") -> ModelBundle:
    """Load a model file (None: the default bundled model) onto ``device`` (auto, cpu, cuda or mps)."""
    source = resolve_model_path(path)
    tensors, card = load_checkpoint(source)
    return build_bundle(tensors, card, select_device(device), source)
