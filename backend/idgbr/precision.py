"""Numeric precision of the networks at inference: which one a run uses, and the autocast that applies it.

Only the networks run in half precision (bf16 or fp16, through ``torch.autocast``); everything after them,
the sampler's rules, the blending of tiles and the confidence gate, works in float32.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .errors import IdgbrError
from .limits import PRECISIONS

HALF_TYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_bf16() -> bool:
    """True on CPUs with bf16 units (AMX or AVX512-BF16), where bf16 convolutions beat float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


# The precision of a run that names none, on every device. On the CPU bf16 moves about 0.25 % of the pixels and
# left every validation metric of the model card within 0.0003 of fp32 (docs/validation/dubai5_bf16.json).
DEFAULT_PRECISION = "auto"


def check_precision(requested: str | None) -> str | None:
    """``requested`` as one of PRECISIONS, or None (the default); raises IdgbrError for anything else."""
    if requested is None:
        return None
    value = str(requested).strip().lower()
    if value not in PRECISIONS:
        raise IdgbrError(f"Unknown precision {requested!r}: use auto, fp32, bf16 or fp16 (fix --precision).",
                         parameter="precision")
    return value


def resolve_precision(requested: str | None, device: torch.device) -> str:
    """The precision a run on ``device`` uses for ``requested`` (None: ``DEFAULT_PRECISION``): fp32, bf16 or
    fp16.

    auto: bf16 on CPUs with AMX or AVX512-BF16, a half type on CUDA (bf16 where the GPU has it, else fp16),
    fp32 elsewhere. Raises IdgbrError for an unknown value or one the device cannot run."""
    value = check_precision(requested) or DEFAULT_PRECISION
    cuda = device.type == "cuda"
    if value == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"
    if value == "fp16" and not cuda:
        raise IdgbrError(f"fp16 runs only on a CUDA GPU, and this run is on the {device.type.upper()}. Use "
                         "--precision bf16 (fast on CPUs with AMX or AVX512-BF16), fp32 or auto.",
                         parameter="precision")
    if value == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise IdgbrError("This GPU has no bf16 support: use --precision fp16, fp32 or auto.", parameter="precision")
    return value


def precision_note(requested: str | None, used: str, device: torch.device) -> str:
    """The run's note on its precision."""
    asked = check_precision(requested)
    why = " (the default)" if asked is None else ""
    if asked == "auto":
        why = " (auto: this CPU has AMX or AVX512-BF16)" if used == "bf16" and device.type == "cpu" else " (auto)"
    if used == "fp32":
        return f"Precision: fp32{why}."
    return (f"Precision: {used} for the networks{why}; fp32 for the refiner's rules, the blending of tiles and the "
            "confidence gate.")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context the networks run in: autocast to the half type, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=HALF_TYPES[precision])
