"""The networks, the sampler and the guard band: shapes, determinism, position-seeded noise."""

from __future__ import annotations

import numpy as np
import torch

from idgbr.model_bundle import load_bundle
from idgbr.models.coarse import CoarseConfig, CoarseNet
from idgbr.models.diffusion import apply_guard_band, guard_band_mask, position_noise
from idgbr.models.refiner import Refiner, RefinerConfig


def _striped_ids(size: int = 64) -> torch.Tensor:
    ids = torch.zeros(1, size, size, dtype=torch.long)
    ids[:, :, size // 2:] = 1
    return ids


def test_networks_give_one_logit_per_class_and_pixel():
    coarse = CoarseNet(CoarseConfig(num_classes=5)).eval()
    refiner = Refiner(RefinerConfig(num_classes=5)).eval()
    image = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert coarse(image).shape == (2, 5, 64, 96)
        ids = torch.randint(0, 5, (2, 64, 96))
        assert refiner.sample(image, ids, torch.randn(2, 5, 64, 96), steps=3).shape == (2, 5, 64, 96)


def test_refiner_loss_is_finite_and_trainable():
    refiner = Refiner(RefinerConfig(num_classes=2))
    truth = _striped_ids().repeat(2, 1, 1)
    truth[0, :4, :4] = 255  # unlabelled pixels are allowed
    loss = refiner.loss(torch.randn(2, 3, 64, 64), torch.zeros_like(truth), truth)
    loss.backward()
    assert torch.isfinite(loss)
    assert refiner.guidance.at_half[0][0].weight.grad is not None


def test_noise_depends_only_on_raster_position():
    whole = position_noise(7, (0, 0), (3, 200, 200))
    window = position_noise(7, (37, 101), (3, 90, 64))
    assert torch.equal(window, whole[:, 37:127, 101:165])
    assert not torch.equal(position_noise(8, (0, 0), (3, 64, 64)), whole[:, :64, :64])


def test_same_seed_gives_the_same_map_whatever_the_batch(bundled_model):
    bundle = load_bundle(bundled_model, device="cpu")
    images = bundle.normalize(torch.rand(2, 3, 64, 64).numpy() * 255)
    ids = torch.randint(0, bundle.num_classes, (2, 64, 64))
    ids[:, :, :32] = 0
    origins = [(0, 0), (512, 64)]
    pair = bundle.refine(images, ids, origins, steps=2, seed=5)
    single = bundle.refine(images[1:], ids[1:], origins[1:], steps=2, seed=5)
    again = bundle.refine(images, ids, origins, steps=2, seed=5)
    assert torch.equal(pair.argmax(1), again.argmax(1))
    assert torch.allclose(pair[1:], single, atol=1e-4)


def test_guard_band_leaves_pixels_far_from_coarse_boundaries_untouched():
    coarse = _striped_ids(64)  # one vertical boundary between columns 31 and 32
    wild = torch.randn(1, 2, 64, 64) * 10  # a refiner output that disagrees everywhere
    guarded = apply_guard_band(wild, coarse, band=4).argmax(1)
    far = ~guard_band_mask(coarse, 4)
    assert torch.equal(guarded[far], coarse[far])
    assert far[0, :, :27].all() and far[0, :, 37:].all()
    assert not far[0, :, 28:36].any()
    near = ~far
    assert torch.equal(guarded[near], wild.argmax(1)[near])


def test_bundle_reports_its_cost():
    bundle = load_bundle(None, device="cpu")
    assert bundle.flops_per_megapixel(steps=4) > bundle.flops_per_megapixel(steps=1) > 0


def test_guard_band_applied_after_sampling_gives_the_same_map(bundled_model):
    """Validation scores every band from one unguarded sample; that must equal sampling with the band on."""
    from idgbr.validate import guarded, refine_scene

    bundle = load_bundle(bundled_model, device="cpu")
    image = (torch.rand(96, 96, 3) * 255).to(torch.uint8).numpy()
    coarse = np.zeros((96, 96), np.uint8)
    coarse[:, 40:] = 1
    coarse[60:80, 10:30] = 2
    free = refine_scene(bundle, image, coarse, steps=1)
    for band in (0, 4, 8):
        assert np.array_equal(guarded(free, coarse, band), refine_scene(bundle, image, coarse, 1, guard_band=band))
