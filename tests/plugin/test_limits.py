"""The plugin offers exactly what the backend accepts: devices, precisions, the default model and the ranges.

The plugin never imports the backend, so it keeps its own copy of the limits; these tests fail when the two
drift apart (a device the toolbox cannot choose, a step count the dock allows and the backend refuses)."""

from __future__ import annotations

import pytest

import idgbr.limits as backend_limits
import idgbr_qgis.limits as plugin_limits


def _public(module) -> dict:
    return {name: getattr(module, name) for name in dir(module) if name.isupper()}


def test_plugin_mirrors_every_backend_limit():
    assert _public(plugin_limits) == _public(backend_limits)


def test_toolbox_offers_every_device_and_the_full_step_range(qgis_processing):
    from idgbr_qgis.processing.refine import RefineAlgorithm

    algorithm = RefineAlgorithm()
    algorithm.initAlgorithm({})
    assert algorithm.parameterDefinition("DEVICE").options() == list(backend_limits.DEVICES)
    steps = algorithm.parameterDefinition("STEPS")
    assert (steps.minimum(), steps.maximum()) == (backend_limits.MIN_STEPS, backend_limits.MAX_STEPS)
    assert algorithm.parameterDefinition("BAND").maximum() == backend_limits.MAX_RULE_PX
    precision = algorithm.parameterDefinition("PRECISION")
    assert len(precision.options()) == len(backend_limits.PRECISIONS) + 1  # + the device's default


def test_dock_settings_allow_the_backend_step_range(qgis_app):
    from idgbr_qgis.ui import config

    assert config.MAX_STEPS == backend_limits.MAX_STEPS
    assert config.MODEL_DEFAULT < backend_limits.MIN_STEPS  # the "model default" value is never a step count
    assert config.DEFAULT_MODEL == backend_limits.DEFAULT_MODEL


@pytest.mark.parametrize("device", backend_limits.DEVICES)
def test_service_accepts_every_device(device):
    from idgbr.service.app import JobRequest

    assert JobRequest(input="/in.tif", output="/out.tif", device=device).device == device


def test_service_refuses_an_unknown_device_or_precision():
    from pydantic import ValidationError

    from idgbr.service.app import JobRequest

    with pytest.raises(ValidationError, match="auto, cpu, cuda, mps"):
        JobRequest(input="/in.tif", output="/out.tif", device="tpu")
    with pytest.raises(ValidationError, match="auto, fp32, bf16, fp16"):
        JobRequest(input="/in.tif", output="/out.tif", precision="fp8")
