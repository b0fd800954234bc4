"""A tiny end-to-end training run on real Dubai images: coarse model, out-of-fold maps, refiner."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from idgbr.degrade import DEGRADATIONS, random_degradation
from idgbr.model_bundle import load_bundle
from idgbr.train import train_coarse, train_refiner

DUBAI = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "dubai-aerial"


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """Two tiles of two 160 px crops each, from the real data."""
    if not DUBAI.is_dir():
        pytest.skip(f"training data not found at {DUBAI}")
    root = tmp_path / "data"
    for tile in ("tile2", "tile3"):
        for part in ("image_part_001", "image_part_002"):
            for kind, ext in (("images", ".jpg"), ("masks", ".png")):
                (root / tile / kind).mkdir(parents=True, exist_ok=True)
                with Image.open(DUBAI / tile / kind / (part + ext)) as img:
                    img.crop((0, 0, 160, 160)).save(root / tile / kind / (part + ext))
    return root


def test_training_writes_models_that_run(tiny_dataset: Path, tmp_path: Path):
    fold = tmp_path / "fold.safetensors"
    coarse = tmp_path / "coarse.safetensors"
    full = tmp_path / "model.safetensors"
    settings = dict(epochs=1, minutes=None, batch=2, crop=64, lr=1e-3, device_name="cpu", seed=0)
    train_coarse(tiny_dataset, fold, ["tile2"], "multiclass", **settings)
    train_coarse(tiny_dataset, coarse, ["tile2", "tile3"], "multiclass", **settings)
    card = train_refiner(tiny_dataset, full, coarse, [(fold, ["tile3"])], **settings)
    assert card["parts"] == ["coarse", "refiner"]
    assert card["training"]["refiner"]["iterations"] >= 1
    bundle = load_bundle(full, device="cpu")
    image = bundle.normalize(np.random.default_rng(0).uniform(0, 255, (1, 3, 32, 32)))
    ids = bundle.segment(image).argmax(1)
    assert bundle.refine(image, ids, [(0, 0)], steps=2).shape == (1, 5, 32, 32)
    shutil.rmtree(tiny_dataset)


def test_refiner_trains_without_fold_models_and_fcn_is_a_usable_coarse_model(tiny_dataset: Path, tmp_path: Path):
    """No --oof: the coarse model's own maps stand in. The FCN architecture loads and segments like the CNN."""
    settings = dict(epochs=1, minutes=None, batch=2, crop=64, lr=1e-3, device_name="cpu", seed=0)
    fcn = tmp_path / "fcn.safetensors"
    card = train_coarse(tiny_dataset, fcn, ["tile2", "tile3"], "binary", architecture="fcn", **settings)
    assert card["architecture"]["coarse"]["kind"] == "fcn" and card["num_classes"] == 2
    card = train_refiner(tiny_dataset, tmp_path / "model.safetensors", fcn, [], **settings)
    assert card["training"]["refiner"]["out_of_fold_models"] == {}
    bundle = load_bundle(tmp_path / "model.safetensors", device="cpu")
    assert type(bundle.coarse).__name__ == "FcnNet"
    image = bundle.normalize(np.random.default_rng(0).uniform(0, 255, (1, 3, 48, 48)))
    ids = bundle.segment(image).argmax(1)
    assert ids.shape == (1, 48, 48)
    assert bundle.refine(image, ids, [(0, 0)], steps=1).shape == (1, 2, 48, 48)


def test_degradations_change_maps_but_keep_valid_ids():
    truth = torch.zeros(2, 64, 64, dtype=torch.long)
    truth[:, 20:40, 10:50] = 3
    truth[:, :, 55:] = 2
    generator = torch.Generator().manual_seed(0)
    for degrade in DEGRADATIONS:
        out = degrade(truth, 5, generator)
        assert out.shape == truth.shape and int(out.min()) >= 0 and int(out.max()) < 5
    changed = [bool((random_degradation(truth, 5, generator) != truth).any()) for _ in range(10)]
    assert sum(changed) >= 8
