"""The dock's persistent settings (QgsSettings) and the bundled models' cards, read without torch.

The backend interpreter setting belongs to `idgbr_qgis.backend_process` (SETTINGS_PYTHON); the keys here are the
ones only the dock and the settings dialog use.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional
from urllib.parse import urlparse

from qgis.core import QgsApplication, QgsSettings

from ..i18n import tr
from ..limits import DEFAULT_MODEL, DEVICES, MAX_PIXEL_SIZE_M, MAX_RULE_PX, MAX_STEPS, MIN_STEPS, PRECISIONS

KEY_DEVICE = "idgbr/device"
KEY_MODEL = "idgbr/model"
KEY_STEPS = "idgbr/steps"
# The never-harm rules (the old "idgbr/guard_band" had another meaning for 0 and is not read any more).
KEY_BAND = "idgbr/band"
KEY_VOCABULARY = "idgbr/vocabulary"
KEY_MIN_CONFIDENCE = "idgbr/min_confidence"
KEY_SHOW_CONFIDENCE = "idgbr/show_confidence"
KEY_SHOW_CHANGES = "idgbr/show_changes"  # add the changed pixels (refined vs coarse) to the results
KEY_OUTPUT_DIR = "idgbr/output_dir"
KEY_PRECISION = "idgbr/precision"  # of the networks; empty: the device's default
KEY_PIXEL_SIZE = "idgbr/pixel_size"  # the input's metres per pixel; 0: from the layer's CRS
KEY_INDEX_URL = "idgbr/index_url"  # the package index of the backend setup; empty: PyTorch's, then pip's

# Devices, precisions, the default model and the ranges come from ..limits (the backend's, mirrored).
MODEL_DEFAULT = MIN_STEPS - 1  # steps: one below the smallest is "take the model card's value"
PRECISION_DEFAULT = ""  # the default: auto (bf16 on CPUs with bf16 units, half on GPUs, else fp32)
# Band and vocabulary (px): -1 switches a rule off, so "the model card's value" is one below.
RULE_DEFAULT = -2
RULE_OFF = -1
# Minimum confidence (0..1, 0 = gate off): one spin-box step below 0 is "the model card's value".
CONFIDENCE_DEFAULT = -0.05


def rule_field(value: int) -> Optional[int]:
    """A band / vocabulary setting as the job's field: None for the card's default, -1 for off."""
    return None if value <= RULE_DEFAULT else int(value)


def confidence_field(value: float) -> Optional[float]:
    """A minimum-confidence setting as the job's field: None for the card's default."""
    return None if value < 0 else round(float(value), 4)


def precision_field(value: str) -> Optional[str]:
    """The precision setting as the job's field: None (the device's default) for an empty one."""
    return value if value in PRECISIONS else None


def pixel_size_field(value: float) -> Optional[float]:
    """The pixel-size setting as the job's field: None (detect from the CRS) for 0."""
    return round(float(value), 6) if value and value > 0 else None


def index_url_problem(url: str) -> Optional[str]:
    """Why `url` cannot be the setup's package index, or None (an empty one means the defaults)."""
    url = url.strip()
    if not url:
        return None
    parts = urlparse(url)
    if parts.scheme in ("http", "https") and parts.netloc:
        return None
    if parts.scheme == "file" and parts.path:
        return None
    return tr("The package index {url} is not a web address: enter one like https://mirror.example.org/simple, "
              "or leave it empty.").format(url=url)


def plugin_dir() -> Path:
    return Path(__file__).resolve().parent.parent


def models_dir() -> Path:
    """The bundled weights: <plugin>/resources/models (a symlink to the repo's resources in a checkout)."""
    return plugin_dir() / "resources" / "models"


def bundled_models() -> Dict[str, Path]:
    """{name: path} of the bundled .safetensors models."""
    folder = models_dir()
    return {p.stem: p for p in sorted(folder.glob("*.safetensors"))} if folder.is_dir() else {}


def model_file(model: str) -> Optional[Path]:
    """The file of a model setting: a bundled name or a path; None when it does not exist."""
    if not model:
        model = DEFAULT_MODEL
    bundled = bundled_models()
    if model in bundled:
        return bundled[model]
    path = Path(model)
    return path if path.suffix.lower() == ".safetensors" and path.is_file() else None


def read_model_card(path: Path) -> Dict[str, Any]:
    """The JSON model card in a safetensors header (8-byte length, JSON header); {} when there is none.

    Only the header is read, with the standard library: the plugin never loads weights.
    """
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length <= 0 or length > 100_000_000:
                return {}
            header = json.loads(fh.read(length).decode("utf-8"))
        raw = (header.get("__metadata__") or {}).get("idgbr_card")
        card = json.loads(raw) if raw else {}
        return card if isinstance(card, dict) else {}
    except (OSError, ValueError, struct.error, AttributeError):
        return {}


def default_output_dir() -> Path:
    return Path(QgsApplication.qgisSettingsDirPath()) / "idgbr" / "results"


@dataclass
class UserSettings:
    """What the user chose, persisted between QGIS sessions."""

    device: str = "auto"
    model: str = DEFAULT_MODEL
    steps: int = MODEL_DEFAULT
    band: int = RULE_DEFAULT
    vocabulary: int = RULE_DEFAULT
    min_confidence: float = CONFIDENCE_DEFAULT
    show_confidence: bool = False
    show_changes: bool = False
    output_dir: str = ""
    pixel_size: float = 0.0  # metres per input pixel; 0 = from the layer's CRS
    precision: str = PRECISION_DEFAULT  # one of PRECISIONS, or the device's default
    index_url: str = ""  # where the backend setup downloads packages; empty = PyTorch's index, then pip's

    @classmethod
    def load(cls, settings: Optional[QgsSettings] = None) -> UserSettings:
        s = settings or QgsSettings()
        device = str(s.value(KEY_DEVICE, "auto") or "auto")
        precision = str(s.value(KEY_PRECISION, PRECISION_DEFAULT) or PRECISION_DEFAULT)
        return cls(
            device=device if device in DEVICES else "auto",
            model=str(s.value(KEY_MODEL, DEFAULT_MODEL) or DEFAULT_MODEL),
            steps=_int(s.value(KEY_STEPS, MODEL_DEFAULT), MODEL_DEFAULT, MAX_STEPS),
            band=_int(s.value(KEY_BAND, RULE_DEFAULT), RULE_DEFAULT, MAX_RULE_PX),
            vocabulary=_int(s.value(KEY_VOCABULARY, RULE_DEFAULT), RULE_DEFAULT, MAX_RULE_PX),
            min_confidence=_float(s.value(KEY_MIN_CONFIDENCE, CONFIDENCE_DEFAULT), CONFIDENCE_DEFAULT, 1.0),
            show_confidence=_bool(s.value(KEY_SHOW_CONFIDENCE, False)),
            show_changes=_bool(s.value(KEY_SHOW_CHANGES, False)),
            output_dir=str(s.value(KEY_OUTPUT_DIR, "") or ""),
            pixel_size=_float(s.value(KEY_PIXEL_SIZE, 0.0), 0.0, MAX_PIXEL_SIZE_M),
            precision=precision if precision in PRECISIONS else PRECISION_DEFAULT,
            index_url=str(s.value(KEY_INDEX_URL, "") or "").strip(),
        )

    def save(self, settings: Optional[QgsSettings] = None) -> None:
        s = settings or QgsSettings()
        s.setValue(KEY_DEVICE, self.device)
        s.setValue(KEY_MODEL, self.model)
        s.setValue(KEY_STEPS, int(self.steps))
        s.setValue(KEY_BAND, int(self.band))
        s.setValue(KEY_VOCABULARY, int(self.vocabulary))
        s.setValue(KEY_MIN_CONFIDENCE, float(self.min_confidence))
        s.setValue(KEY_SHOW_CONFIDENCE, bool(self.show_confidence))
        s.setValue(KEY_SHOW_CHANGES, bool(self.show_changes))
        s.setValue(KEY_OUTPUT_DIR, self.output_dir)
        s.setValue(KEY_PIXEL_SIZE, float(self.pixel_size))
        s.setValue(KEY_PRECISION, self.precision)
        s.setValue(KEY_INDEX_URL, self.index_url.strip())

    def results_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else default_output_dir()

    def job_model(self) -> str:
        """The job's `model` field: a bundled name the service knows, or an absolute path."""
        if self.model in bundled_models() or not self.model:
            return self.model or DEFAULT_MODEL
        return str(Path(self.model).resolve())


def _int(value: Any, low: int, high: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return low
    return max(low, min(high, number))


def _float(value: Any, low: float, high: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return low
    return low if number != number else max(low, min(high, number))


def _bool(value: Any) -> bool:
    """QgsSettings gives back "true" / "false" strings on some platforms."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def model_choices() -> List[str]:
    return list(bundled_models())
