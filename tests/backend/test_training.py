"""Tiny end-to-end training runs on real Dubai images: coarse model, refiner, resuming, degradations."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from idgbr.checkpoint import load_checkpoint, save_checkpoint
from idgbr.degrade import DEGRADATIONS, mild_displacement, random_degradation
from idgbr.model_bundle import load_bundle
from idgbr.refiner_training import STATE_SUFFIX, RefinerRun, train_refiner
from idgbr.train import train_coarse

DUBAI = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "dubai-aerial"
COARSE_SETTINGS = dict(epochs=1, minutes=None, batch=2, crop=64, lr=1e-3, device_name="cpu", seed=0)


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


def _refiner_run(data: Path, coarse: Path, out: Path, **changes) -> RefinerRun:
    settings = dict(data=data, output=out, coarse_model=coarse, tiles=["tile2", "tile3"], iterations=4, batch=2,
                    crop=64, device="cpu", precision="fp32", save_minutes=1e6)
    return RefinerRun(**{**settings, **changes})


def test_training_writes_models_that_run(tiny_dataset: Path, tmp_path: Path):
    coarse = tmp_path / "coarse.safetensors"
    full = tmp_path / "model.safetensors"
    train_coarse(tiny_dataset, coarse, ["tile2", "tile3"], "multiclass", **COARSE_SETTINGS)
    card = train_refiner(_refiner_run(tiny_dataset, coarse, full, iterations=3))
    assert card.parts == ["coarse", "refiner"]
    training = card.training["refiner"]
    assert training["iterations"] == 3 and training["hours"] >= 0 and training["coarse_sources"] == ["coarse"]
    assert card.sampler.band >= 0 and card.sampler.vocabulary >= 0
    bundle = load_bundle(full, device="cpu")
    image = bundle.normalize(np.random.default_rng(0).uniform(0, 255, (1, 3, 32, 32)))
    ids = bundle.segment(image).argmax(1)
    assert bundle.refine(image, ids, [(0, 0)], steps=2).shape == (1, 5, 32, 32)
    shutil.rmtree(tiny_dataset)


def test_a_half_resolution_refiner_trains_and_runs_from_its_model_file(tiny_dataset: Path, tmp_path: Path):
    """--refiner-resolution 2: the card records the design, and the model file loads and refines at full size."""
    coarse = tmp_path / "coarse.safetensors"
    full = tmp_path / "model.safetensors"
    train_coarse(tiny_dataset, coarse, ["tile2", "tile3"], "multiclass", **COARSE_SETTINGS)
    card = train_refiner(_refiner_run(tiny_dataset, coarse, full, iterations=2, resolution=2))
    assert card.architecture["refiner"]["resolution"] == 2
    bundle = load_bundle(full, device="cpu")
    assert bundle.refiner is not None and bundle.refiner.config.resolution == 2
    image = bundle.normalize(np.random.default_rng(0).uniform(0, 255, (1, 3, 48, 64)))
    ids = bundle.segment(image).argmax(1)
    assert bundle.refine(image, ids, [(0, 0)], steps=1).shape == (1, 5, 48, 64)
    from idgbr.errors import IdgbrError

    with pytest.raises(IdgbrError, match="--refiner-resolution"):  # continued as the other design
        train_refiner(_refiner_run(tiny_dataset, coarse, tmp_path / "other.safetensors", resume=True, warm_start=full))


def test_a_half_resolution_run_starts_from_the_layers_it_shares_with_a_full_resolution_model(
        tiny_dataset: Path, tmp_path: Path):
    """--init-from: a new design need not start from scratch; what it shares with a trained refiner carries over."""
    from idgbr.errors import IdgbrError

    coarse = tmp_path / "coarse.safetensors"
    full = tmp_path / "full.safetensors"
    train_coarse(tiny_dataset, coarse, ["tile2", "tile3"], "multiclass", **COARSE_SETTINGS)
    train_refiner(_refiner_run(tiny_dataset, coarse, full, iterations=2))
    half = tmp_path / "half.safetensors"
    # lr 0: the weights stay as initialised (up to the moving average's rounding), so the file shows what was
    # carried over.
    card = train_refiner(_refiner_run(tiny_dataset, coarse, half, iterations=1, resolution=2, init_from=full, lr=0.0))
    assert card.training["refiner"]["initialised_from"]["model"] == "full"
    assert card.training["refiner"]["initialised_from"]["share_of_parameters"] > 0.5
    a, _ = load_checkpoint(full)
    b, _ = load_checkpoint(half)
    shared = [k for k in b if k.startswith("refiner.") and k in a and a[k].shape == b[k].shape]
    assert len(shared) > 10 and all(torch.allclose(a[k], b[k], atol=1e-6) for k in shared)
    assert card.architecture["refiner"]["resolution"] == 2
    with pytest.raises(IdgbrError, match="--init-from"):  # a new run only
        train_refiner(_refiner_run(tiny_dataset, coarse, tmp_path / "x.safetensors", resume=True, warm_start=full,
                                   init_from=full))


def test_resumed_training_gives_the_same_weights_as_an_uninterrupted_run(tiny_dataset: Path, tmp_path: Path):
    coarse = tmp_path / "coarse.safetensors"
    train_coarse(tiny_dataset, coarse, ["tile2", "tile3"], "multiclass", **COARSE_SETTINGS)
    straight, split = tmp_path / "straight.safetensors", tmp_path / "split.safetensors"
    train_refiner(_refiner_run(tiny_dataset, coarse, straight))
    first = train_refiner(_refiner_run(tiny_dataset, coarse, split, session_iterations=2))
    assert first.training["refiner"]["iterations"] == 2
    assert Path(str(split) + STATE_SUFFIX).is_file()
    second = train_refiner(_refiner_run(tiny_dataset, coarse, split, resume=True))
    assert second.training["refiner"]["iterations"] == 4 and second.training["refiner"]["sessions"] == 2
    # Resumed with the same settings, the run stays one stage.
    assert [s["iterations"] for s in second.training["refiner"]["stages"]] == [[0, 4]]
    # Resuming a run that has finished its schedule adds no session.
    again = train_refiner(_refiner_run(tiny_dataset, coarse, split, resume=True))
    assert again.training["refiner"]["sessions"] == 2 and again.training["refiner"]["stages"] == [
        second.training["refiner"]["stages"][0]]
    a, _ = load_checkpoint(straight)
    b, _ = load_checkpoint(split)
    refiner_keys = [k for k in a if k.startswith("refiner.")]
    assert refiner_keys and all(torch.equal(a[k], b[k]) for k in refiner_keys)


def test_resume_without_a_state_names_the_missing_file(tiny_dataset: Path, tmp_path: Path):
    from idgbr.errors import IdgbrError

    coarse = tmp_path / "coarse.safetensors"
    train_coarse(tiny_dataset, coarse, ["tile2", "tile3"], "binary", architecture="fcn", **COARSE_SETTINGS)
    with pytest.raises(IdgbrError, match="no training state"):
        train_refiner(_refiner_run(tiny_dataset, coarse, tmp_path / "new.safetensors", resume=True))


def test_fcn_is_a_usable_coarse_model_for_a_binary_refiner(tiny_dataset: Path, tmp_path: Path):
    fcn = tmp_path / "fcn.safetensors"
    card = train_coarse(tiny_dataset, fcn, ["tile2", "tile3"], "binary", architecture="fcn", **COARSE_SETTINGS)
    assert card.architecture["coarse"]["kind"] == "fcn" and card.num_classes == 2
    train_refiner(_refiner_run(tiny_dataset, fcn, tmp_path / "model.safetensors", iterations=2))
    bundle = load_bundle(tmp_path / "model.safetensors", device="cpu")
    assert type(bundle.coarse).__name__ == "FcnNet"
    image = bundle.normalize(np.random.default_rng(0).uniform(0, 255, (1, 3, 48, 48)))
    ids = bundle.segment(image).argmax(1)
    assert bundle.refine(image, ids, [(0, 0)], steps=1).shape == (1, 2, 48, 48)


def test_coarse_training_of_a_fixed_length_runs_that_many_iterations(tiny_dataset: Path, tmp_path: Path):
    # The validation FCN is trained by iterations so that every machine validates against the same model.
    settings = {**COARSE_SETTINGS, "epochs": 1000}
    card = train_coarse(tiny_dataset, tmp_path / "fcn.safetensors", ["tile2", "tile3"], "binary",
                        architecture="fcn", iterations=3, **settings)
    assert card.training["coarse"]["iterations"] == 3


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


def test_mild_displacement_only_moves_boundaries_a_few_pixels():
    """The good-model case the refiner must learn to keep: boundaries move by at most 5 px, no region is
    created or lost."""
    truth = torch.zeros(4, 96, 96, dtype=torch.long)
    truth[:, 20:60, 10:70] = 3
    truth[:, :, 80:] = 2
    generator = torch.Generator().manual_seed(1)
    mild = mild_displacement(truth, 5, generator)
    assert (mild != truth).any()
    # Every changed pixel has, within 5 px, a pixel of the class it took in the truth.
    for klass in (0, 2, 3):
        near = torch.nn.functional.max_pool2d((truth == klass).float()[:, None], 11, 1, 5)[:, 0] > 0
        assert bool(near[(mild != truth) & (mild == klass)].all())
    assert set(mild.unique().tolist()) == {0, 2, 3}


def test_warm_start_continues_the_schedule_from_a_model_file(tiny_dataset: Path, tmp_path: Path):
    """Another machine has no training state: the shipped model file carries the run on."""
    coarse = tmp_path / "coarse.safetensors"
    train_coarse(tiny_dataset, coarse, ["tile2", "tile3"], "multiclass", **COARSE_SETTINGS)
    shipped = tmp_path / "shipped.safetensors"
    train_refiner(_refiner_run(tiny_dataset, coarse, shipped, session_iterations=2))
    out = tmp_path / "continued.safetensors"
    card = train_refiner(_refiner_run(tiny_dataset, coarse, out, resume=True, warm_start=shipped))
    assert card.training["refiner"]["iterations"] == 4 and card.training["refiner"]["sessions"] == 2
    # Continued at another precision (a machine with bf16 units), the card keeps both.
    mixed = train_refiner(_refiner_run(tiny_dataset, coarse, tmp_path / "mixed.safetensors", resume=True,
                                       warm_start=shipped, precision="bf16"))
    assert mixed.training["refiner"]["precision"] == "fp32 then bf16"
    assert [(s["iterations"], s["precision"]) for s in mixed.training["refiner"]["stages"]] == [
        ([0, 2], "fp32"), ([2, 4], "bf16")]
    # A model file from before stages were recorded: its card's precision becomes the first stage.
    tensors, old_card = load_checkpoint(shipped)
    del old_card.training["refiner"]["stages"]
    legacy = tmp_path / "legacy.safetensors"
    save_checkpoint(legacy, tensors, old_card)
    continued = train_refiner(_refiner_run(tiny_dataset, coarse, tmp_path / "from_legacy.safetensors", resume=True,
                                           warm_start=legacy, precision="bf16"))
    assert [(s["iterations"], s["precision"]) for s in continued.training["refiner"]["stages"]] == [
        ([0, 2], "fp32"), ([2, 4], "bf16")]
    # Stopped within the warm start's warm-up and resumed from the state, the run ends where the
    # uninterrupted one did: the warm-up goes on where it stopped.
    split = tmp_path / "split.safetensors"
    train_refiner(_refiner_run(tiny_dataset, coarse, split, resume=True, warm_start=shipped, session_iterations=1))
    train_refiner(_refiner_run(tiny_dataset, coarse, split, resume=True))
    a, _ = load_checkpoint(out)
    b, _ = load_checkpoint(split)
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("refiner."))


def test_coarse_training_continues_from_a_model_file(tiny_dataset: Path, tmp_path: Path):
    """`idgbr train coarse --warm-start`: starts from the file's segmenter, keeps its training record, and refuses
    a segmenter of another architecture."""
    from idgbr.errors import IdgbrError

    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    train_coarse(tiny_dataset, first, ["tile2", "tile3"], "binary", **COARSE_SETTINGS)
    untrained = {**COARSE_SETTINGS, "lr": 0.0}  # a zero learning rate keeps the loaded weights as they are
    card = train_coarse(tiny_dataset, second, ["tile2", "tile3"], "binary", warm_start=first, **untrained)
    a, _ = load_checkpoint(first)
    b, _ = load_checkpoint(second)
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("coarse."))
    earlier = card.training["coarse"]["earlier"]
    assert len(earlier) == 1 and earlier[0]["iterations"] > 0
    with pytest.raises(IdgbrError, match="another coarse segmenter"):
        train_coarse(tiny_dataset, tmp_path / "fcn.safetensors", ["tile2", "tile3"], "binary", architecture="fcn",
                     warm_start=first, **COARSE_SETTINGS)
