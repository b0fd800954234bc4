"""Builds a bundled model file from a trained refiner and (optionally) another model's coarse segmenter.

    python tools/assemble_model.py runs/dubai5_refiner.safetensors -o resources/models/dubai5.safetensors
    python tools/assemble_model.py runs/roads2_refiner.safetensors --coarse runs/other_roads_coarse.safetensors \\
        -o resources/models/other_roads.safetensors

A refiner can serve several binary models (``--coarse``): the coarse model supplies the classes, bands,
normalisation and pixel size. The weights are stored in half precision: the plugin ZIP must stay under the
official repository's 25 MB, and the models compute in fp32 after loading (agreement measured in
docs/MODEL_CARD.md).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from pathlib import Path

from idgbr.card import ModelCard
from idgbr.checkpoint import load_checkpoint, save_checkpoint
from idgbr.refiner_training import EMA_DECAY, STATE_SUFFIX


def assemble(refiner_path: Path, out: Path, coarse_path: Path | None = None, last: bool = False) -> ModelCard:
    tensors, refiner_card = load_checkpoint(refiner_path)
    card = copy.deepcopy(refiner_card)
    if last:
        # The last iteration's weights instead of their moving average (from the resumable training state).
        import torch

        state = torch.load(Path(str(refiner_path) + STATE_SUFFIX), map_location="cpu", weights_only=False)
        tensors.update({f"refiner.{k}": v for k, v in state["model"].items()})
        card.training["refiner"]["weights"] = "last iteration"
    card.training["refiner"].setdefault("weights", f"moving average (decay {EMA_DECAY})")
    if coarse_path is not None:
        coarse_tensors, coarse_card = load_checkpoint(coarse_path)
        if coarse_card.num_classes != card.num_classes:
            raise SystemExit(f"{coarse_path} has {coarse_card.num_classes} classes, the refiner "
                             f"{card.num_classes}: they cannot form one model.")
        if coarse_card.normalization != card.normalization:
            raise SystemExit(f"{coarse_path} normalises its input unlike the refiner's training; retrain it "
                             "with the Dubai statistics.")
        tensors = {k: v for k, v in tensors.items() if not k.startswith("coarse.")}
        tensors.update({k: v for k, v in coarse_tensors.items() if k.startswith("coarse.")})
        refiner_training = card.training["refiner"]
        card = dataclasses.replace(copy.deepcopy(coarse_card), sampler=card.sampler, metrics={})
        card.architecture["refiner"] = refiner_card.architecture["refiner"]
        card.training["refiner"] = refiner_training
        card.parts = ["coarse", "refiner"]
    card.name = out.stem
    card.weights_dtype = "float16"
    save_checkpoint(out, tensors, card)
    return card


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("refiner", type=Path, help="a model file written by 'idgbr train refiner'")
    parser.add_argument("--coarse", type=Path, help="take the coarse segmenter (and card) from this model file")
    parser.add_argument("--last", action="store_true",
                        help="ship the last iteration's weights (from REFINER.state.pt), not their moving average")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    card = assemble(args.refiner, args.output, args.coarse, args.last)
    print(f"wrote {args.output} ({card.name}: {', '.join(c.name for c in card.classes)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
