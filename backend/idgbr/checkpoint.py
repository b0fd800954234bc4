"""Model files: safetensors weights with the JSON model card in the file's metadata. Never unpickles."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import IdgbrError
from .resolution import metres, pixel_size_range, range_problem, working_pixel_size

FORMAT = "idgbr-bundle/1"
CARD_KEY = "idgbr_card"
MAX_CLASSES = 255  # class ids 0..254 in a uint8 output whose nodata is 255
COLOR = re.compile(r"^#[0-9A-Fa-f]{6}$")


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], card: dict) -> None:
    """Write weights and card atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    card = {**card, "format": FORMAT}
    # A card with "weights_dtype": "float16" (the shipped models) keeps its weights in half precision.
    half = card.get("weights_dtype") == "float16"
    contiguous = {name: (t.half() if half and t.is_floating_point() else t).detach().cpu().contiguous()
                  for name, t in tensors.items()}
    handle, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file(contiguous, tmp_name, metadata={CARD_KEY: json.dumps(card)})
        os.chmod(tmp_name, 0o644)  # mkstemp makes it private; model files are meant to be shared
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def read_card(path: Path) -> dict:
    """The model card of a model file, with clear errors for missing, truncated and foreign files."""
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
        card = json.loads(metadata[CARD_KEY])
    except json.JSONDecodeError as exc:
        raise IdgbrError(f"The model card in {path} is damaged ({exc}).") from exc
    return validate_card(card, path)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_card(card: Any, path: Path | str | None = None) -> dict:
    """The card itself when every field the backend uses is present and sane; else one IdgbrError that names
    the file and the field. Unknown keys are allowed (cards grow), missing optional ones take defaults."""
    where = path or "the model file"

    def bad(field: str, problem: str) -> IdgbrError:
        what = f"is invalid: {field} {problem}" if field else problem
        return IdgbrError(f"The model card in {where} {what}. The file was edited or damaged: use a model "
                          "written by 'idgbr train', or the bundled model.")

    def whole(field: str, value: Any, low: int, high: int) -> None:
        if not _is_int(value) or not low <= value <= high:
            raise bad(field, f"is {value!r}; it must be a whole number from {low} to {high}")

    def number_list(field: str, value: Any) -> list:
        if not isinstance(value, list) or not value or not all(_is_number(v) for v in value):
            raise bad(field, f"is {value!r}; it must be a list of numbers")
        return value

    if not isinstance(card, dict):
        raise bad("", f"is a JSON {type(card).__name__}, not an object with the card's fields")
    if card.get("format") != FORMAT:
        raise IdgbrError(f"{where} has model format {card.get('format')!r}; this backend reads {FORMAT!r}. "
                         "Update the plugin or retrain the model.")
    for key in ("num_classes", "classes", "normalization", "architecture"):
        if key not in card:
            raise bad(key, "is missing")
    k = card["num_classes"]
    whole("num_classes", k, 1, MAX_CLASSES)
    classes = card["classes"]
    if not isinstance(classes, list) or len(classes) != k:
        count = f"lists {len(classes)} classes" if isinstance(classes, list) else f"is {classes!r}"
        raise bad("classes", f"{count} but num_classes is {k}")
    for i, entry in enumerate(classes):
        if not isinstance(entry, dict):
            raise bad(f"classes[{i}]", f"is {entry!r}, not an object with id, name and color")
        whole(f"classes[{i}].id", entry.get("id"), 0, k - 1)
        if not isinstance(entry.get("name"), str) or not entry["name"].strip():
            raise bad(f"classes[{i}].name", f"is {entry.get('name')!r}; it must be a non-empty text")
        if not isinstance(entry.get("color"), str) or not COLOR.match(entry["color"]):
            raise bad(f"classes[{i}].color", f"is {entry.get('color')!r}; it must be a colour such as #1F78B4")
    ids = sorted(entry["id"] for entry in classes)
    if ids != list(range(k)):
        raise bad("classes", f"has the ids {ids}; they must be 0 to {k - 1}, each once")
    norm = card["normalization"]
    if not isinstance(norm, dict):
        raise bad("normalization", f"is {norm!r}, not an object with mean and std")
    mean = number_list("normalization.mean", norm.get("mean"))
    std = number_list("normalization.std", norm.get("std"))
    if len(std) != len(mean):
        raise bad("normalization.std", f"has {len(std)} values but normalization.mean has {len(mean)}")
    if any(v <= 0 for v in std):
        raise bad("normalization.std", f"is {std}; every value must be above 0 (it divides the pixels)")
    channels = len(mean)
    bands = card.get("bands")
    if bands is not None and (not isinstance(bands, list) or len(bands) != channels
                              or not all(isinstance(b, str) for b in bands)):
        raise bad("bands", f"is {bands!r}; it must name the model's {channels} input bands")
    defaults = card.get("bands_default")
    if defaults is not None and (not isinstance(defaults, list) or len(defaults) != channels
                                 or not all(_is_int(b) and b >= 1 for b in defaults)):
        raise bad("bands_default", f"is {defaults!r}; it must be {channels} band numbers from 1")
    if "tile_size" in card:
        whole("tile_size", card["tile_size"], 16, 4096)
    if "overlap" in card:
        whole("overlap", card["overlap"], 0, int(card.get("tile_size", 512)) // 2)
    if "size_multiple" in card:
        whole("size_multiple", card["size_multiple"], 1, 1024)
    pixel = card.get("pixel_size_m")
    if pixel is not None and (not _is_number(pixel) or pixel <= 0):
        raise bad("pixel_size_m", f"is {pixel!r}; it must be a positive number (or null)")
    problem = range_problem(card)
    if problem:
        raise bad("pixel_size_range_m", problem)
    if card.get("task", "multiclass") not in ("multiclass", "binary"):
        raise bad("task", f"is {card['task']!r}; it must be 'multiclass' or 'binary'")
    _validate_sampler(card.get("sampler", {}), bad, whole)
    _validate_architecture(card["architecture"], k, channels, where, bad)
    return card


def _validate_sampler(sampler: Any, bad: Any, whole: Any) -> None:
    if not isinstance(sampler, dict):
        raise bad("sampler", f"is {sampler!r}, not an object")
    for key, low, high in (("steps", 1, 100), ("seed", 0, 2**31 - 1), ("band", -1, 1024), ("vocabulary", -1, 1024)):
        if key in sampler:
            whole(f"sampler.{key}", sampler[key], low, high)
    strength = sampler.get("strength", 1.0)
    if not _is_number(strength) or not 0 < strength <= 1:
        raise bad("sampler.strength", f"is {strength!r}; it must be a number above 0 and at most 1")
    gate = sampler.get("min_confidence", 0.0)
    if not _is_number(gate) or not 0 <= gate <= 1:
        raise bad("sampler.min_confidence", f"is {gate!r}; it must be a number from 0 to 1")


def _validate_architecture(arch: Any, k: int, channels: int, where: Any, bad: Any) -> None:
    from .models.fcn import FCN_KIND
    from .models.refiner import REFINER_KIND

    if not isinstance(arch, dict) or not ({"coarse", "refiner"} & set(arch)):
        raise bad("architecture", "has neither a coarse segmenter nor a refiner")
    for part in ("coarse", "refiner"):
        if part not in arch:
            continue
        spec = arch[part]
        if not isinstance(spec, dict):
            raise bad(f"architecture.{part}", f"is {spec!r}, not an object")
        if spec.get("num_classes", k) != k:
            raise bad(f"architecture.{part}.num_classes", f"is {spec['num_classes']!r} but num_classes is {k}")
        if spec.get("in_channels", channels) != channels:
            raise bad(f"architecture.{part}.in_channels",
                      f"is {spec['in_channels']!r} but normalization has {channels} bands")
    if "refiner" in arch:
        kind = arch["refiner"].get("kind", "idgbr-refiner/1")  # the first refiner's cards named no kind
        if kind != REFINER_KIND:
            raise IdgbrError(f"{where} holds a refiner of kind {kind!r}; this backend runs {REFINER_KIND!r}. A model "
                             "from an earlier version of IDGBR: use the bundled models or retrain its refiner "
                             "('idgbr train refiner'); a newer one: update the plugin.")
    kind = arch.get("coarse", {}).get("kind", "coarse")
    if kind not in ("coarse", FCN_KIND):
        raise bad("architecture.coarse.kind", f"is {kind!r}; this backend builds the default segmenter or "
                                              f"{FCN_KIND!r}")


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
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


def _resolution_text(card: dict) -> str:
    """'working 0.5 m per pixel, valid from 0.25 to 1 m (default range: working / 2 to * 2)'."""
    low, high = pixel_size_range(card)
    default = "" if card.get("pixel_size_range_m") else " (default range: working / 2 to * 2)"
    return (f"working {metres(working_pixel_size(card))} m per pixel, valid from {metres(low)} to {metres(high)} m"
            f"{default}")


def describe(card: dict) -> str:
    """Human-readable summary of a model card (what 'idgbr info' prints before the JSON)."""
    classes = ", ".join(f"{c['id']}={c['name']}" for c in card.get("classes", []))
    sampler = card.get("sampler", {})
    lines = [
        f"model        {card.get('name')} ({card.get('task')}, {card.get('num_classes')} classes)",
        f"classes      {classes}",
        f"bands        {card.get('bands')} from input bands {card.get('bands_default')}",
        f"tile         {card.get('tile_size')} px, overlap {card.get('overlap')} px",
        f"resolution   {_resolution_text(card)}",
        f"sampler      {sampler.get('steps')} DDIM steps, strength {sampler.get('strength')}, "
        f"seed {sampler.get('seed')}",
        f"rules        {rules_text(sampler.get('band'), sampler.get('vocabulary'), sampler.get('min_confidence'))} "
        "(the refiner's never-harm rules; see 'idgbr refine --help')",
        f"parts        {', '.join(card.get('parts', []))}",
    ]
    return "\n".join(lines)


def _info(args: argparse.Namespace) -> int:
    from .model_bundle import resolve_model_path

    card = read_card(resolve_model_path(args.model))
    if args.json:
        print(json.dumps(card, indent=2))
    else:
        print(describe(card))
        print(json.dumps({k: card[k] for k in ("training", "metrics") if k in card}, indent=2))
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("info", help="print a model file's card (classes, bands, sampler defaults, "
                                   "training data, validation metrics)")
    parser.add_argument("model", nargs="?", default=None,
                        help="model file or bundled model name (dubai5, roads2, buildings2); default: dubai5")
    parser.add_argument("--json", action="store_true", help="print the whole card as JSON")
    parser.set_defaults(func=_info)
