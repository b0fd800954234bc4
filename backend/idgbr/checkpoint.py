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

from .errors import IdgbrError

FORMAT = "idgbr-bundle/1"
CARD_KEY = "idgbr_card"


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], card: dict) -> None:
    """Write weights and card atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    card = {**card, "format": FORMAT}
    contiguous = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
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
    if card.get("format") != FORMAT:
        raise IdgbrError(f"{path} has model format {card.get('format')!r}; this backend reads {FORMAT!r}. "
                         "Update the plugin or retrain the model.")
    return card


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights (on the CPU) and card of a model file."""
    card = read_card(path)
    try:
        tensors = {}
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensors[name] = handle.get_tensor(name)
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


def describe(card: dict) -> str:
    """Human-readable summary of a model card (what 'idgbr info' prints before the JSON)."""
    classes = ", ".join(f"{c['id']}={c['name']}" for c in card.get("classes", []))
    sampler = card.get("sampler", {})
    lines = [
        f"model        {card.get('name')} ({card.get('task')}, {card.get('num_classes')} classes)",
        f"classes      {classes}",
        f"bands        {card.get('bands')} from input bands {card.get('bands_default')}",
        f"tile         {card.get('tile_size')} px, overlap {card.get('overlap')} px, "
        f"nominal pixel {card.get('pixel_size_m')} m",
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
                        help="model file or bundled model name (dubai5, roads2); default: dubai5")
    parser.add_argument("--json", action="store_true", help="print the whole card as JSON")
    parser.set_defaults(func=_info)
