"""Model files: safetensors weights with the JSON model card in the file's metadata. Never unpickles."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .card import FORMAT, CardLike, ModelCard
from .errors import IdgbrError
from .resolution import metres, pixel_size_range, working_pixel_size

CARD_KEY = "idgbr_card"


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], card: CardLike) -> None:
    """Write weights and card atomically (temporary file in the same folder, then rename). The card (a
    ModelCard or its JSON object) is checked first: a file is never written with a card it could not read."""
    path = Path(path)
    data = card.to_dict() if isinstance(card, ModelCard) else dict(card)
    checked = ModelCard.from_dict({**data, "format": FORMAT}, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A card with "weights_dtype": "float16" (the shipped models) keeps its weights in half precision.
    half = checked.weights_dtype == "float16"
    contiguous = {name: (t.half() if half and t.is_floating_point() else t).detach().cpu().contiguous()
                  for name, t in tensors.items()}
    handle, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file(contiguous, tmp_name, metadata={CARD_KEY: json.dumps(checked.to_dict())})
        os.chmod(tmp_name, 0o644)  # mkstemp makes it private; model files are meant to be shared
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def read_card(path: Path) -> ModelCard:
    """The checked model card of a model file, with clear errors for missing, truncated and foreign files."""
    path = Path(path)
    if not path.is_file():
        raise IdgbrError(f"Model file not found: {path}. Give a .safetensors file written by 'idgbr train', "
                         "or leave the model option empty to use the bundled model.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:  # safetensors raises several types for broken headers
        raise IdgbrError(f"{path} is not a readable model file ({exc}). It may be truncated or not a "
                         "safetensors file: download or copy it again, or use the bundled model.") from exc
    if CARD_KEY not in metadata:
        raise IdgbrError(f"{path} is a safetensors file but not an IDGBR model (it has no model card). "
                         "Use a model written by 'idgbr train' or the bundled model.")
    try:
        data = json.loads(metadata[CARD_KEY])
    except json.JSONDecodeError as exc:
        raise IdgbrError(f"The model card in {path} is damaged ({exc}).") from exc
    return ModelCard.from_dict(data, path)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], ModelCard]:
    """Weights (on the CPU, float16 ones widened to float32) and card of a model file."""
    card = read_card(path)
    try:
        tensors = {}
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensor = handle.get_tensor(name)
                # Shipped weights are stored in half precision (half the download); models compute in fp32.
                tensors[name] = tensor.float() if tensor.dtype == torch.float16 else tensor
    except Exception as exc:
        raise IdgbrError(f"The weights in {path} cannot be read ({exc}); the file is probably truncated. "
                         "Copy it again or use the bundled model.") from exc
    return tensors, card


def split_state(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}


def rules_text(band: int | None, vocabulary: int | None, min_confidence: float | None) -> str:
    """The refiner's never-harm rules in words: 'band 8 px, vocabulary 8 px, min confidence 0.5'; a rule
    switched off (-1, None; 0 for the confidence) reads 'off'."""

    def px(value: int | None) -> str:
        return "off" if value is None or int(value) < 0 else f"{int(value)} px"

    gate = "off" if not min_confidence else f"{float(min_confidence):g}"
    return f"band {px(band)}, vocabulary {px(vocabulary)}, min confidence {gate}"


def _resolution_text(card: ModelCard) -> str:
    """'working 0.5 m per pixel, valid from 0.25 to 1 m (default range: working / 2 to * 2)'."""
    low, high = pixel_size_range(card)
    default = "" if card.pixel_size_range_m else " (default range: working / 2 to * 2)"
    return (f"working {metres(working_pixel_size(card))} m per pixel, valid from {metres(low)} to {metres(high)} m"
            f"{default}")


def describe(card: ModelCard) -> str:
    """Human-readable summary of a model card (what 'idgbr info' prints before the JSON)."""
    classes = ", ".join(f"{c.id}={c.name}" for c in card.classes)
    sampler = card.sampler
    lines = [
        f"model        {card.name} ({card.task}, {card.num_classes} classes)",
        f"classes      {classes}",
        f"bands        {card.bands} from input bands {card.bands_default}",
        f"tile         {card.tile_size} px, overlap {card.overlap} px",
        f"resolution   {_resolution_text(card)}",
        f"sampler      {sampler.steps} DDIM steps, strength {sampler.strength}, seed {sampler.seed}",
        f"rules        {rules_text(sampler.band, sampler.vocabulary, sampler.min_confidence)} "
        "(the refiner's never-harm rules; see 'idgbr refine --help')",
        f"parts        {', '.join(card.parts)}",
    ]
    return "\n".join(lines)


def _info(args: argparse.Namespace) -> int:
    from .model_bundle import resolve_model_path

    card = read_card(resolve_model_path(args.model))
    if args.json:
        print(json.dumps(card.to_dict(), indent=2))
    else:
        print(describe(card))
        print(json.dumps({"training": card.training, "metrics": card.metrics}, indent=2))
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("info", help="print a model file's card (classes, bands, sampler defaults, "
                                   "training data, validation metrics)")
    parser.add_argument("model", nargs="?", default=None,
                        help="model file or bundled model name (dubai5, roads2, buildings2); default: dubai5")
    parser.add_argument("--json", action="store_true", help="print the whole card as JSON")
    parser.set_defaults(func=_info)
