"""The backend's compute device in words, from its `/health` answer (no Qt: also usable outside QGIS)."""

from __future__ import annotations

import re
from typing import Any, Dict, Tuple
from urllib.parse import urlsplit


def describe_device(health: Dict[str, Any]) -> Tuple[str, str]:
    """(label, tooltip) for the device in `/health`: the GPU's name, or CPU and why; on a remote backend (its
    client adds ``remote_url``) also which computer."""
    label, tip = _local_device(health)
    url = str(health.get("remote_url") or "")
    if url:
        host = urlsplit(url).netloc or url
        version = f" (IDGBR {health['version']})" if health.get("version") else ""
        return f"{label} at {host}", f"Remote backend {url}{version}. {tip}"
    return label, tip


def _local_device(health: Dict[str, Any]) -> Tuple[str, str]:
    torch_version = health.get("torch") or "?"
    device = str(health.get("device") or "cpu")
    name = health.get("device_name")
    if device == "cuda":
        return f"Device: GPU — {name or 'CUDA'}", f"torch {torch_version}, CUDA {health.get('torch_cuda') or '?'}"
    if device == "mps":
        return f"Device: {name or 'Apple GPU (MPS)'}", f"torch {torch_version}"
    reason = str(health.get("device_reason") or "")
    short = re.sub(r"^torch\.cuda\.is_available\(\) is False:\s*", "", reason)
    short = re.sub(r"\s*\(.*\)$", "", short)
    return (f"Device: CPU — {short}" if short else "Device: CPU"), f"torch {torch_version}. {reason}".strip()
