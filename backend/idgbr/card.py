"""The model card: the JSON a model file carries in its safetensors metadata (key "idgbr_card"), as typed
dataclasses. ``ModelCard.from_dict`` is the one place a card is checked and its defaults are filled in;
``ModelCard.to_dict`` is the one place its JSON is written.

Unknown keys are kept (``extra``) so that a card written by a newer version survives a read and a write.
A field a card leaves out takes the default below; written back, the card states it.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from .errors import IdgbrError
from .limits import MAX_RULE_PX, MAX_SEED, MAX_STEPS, MAX_TILE, MIN_STEPS, MIN_TILE

FORMAT = "idgbr-bundle/1"
MAX_CLASSES = 255  # class ids 0..254 in a uint8 output whose nodata is 255
COLOR = re.compile(r"^#[0-9A-Fa-f]{6}$")
TASKS = ("multiclass", "binary")
REQUIRED = ("num_classes", "classes", "normalization", "architecture")

# Defaults of a card that leaves a field out, written nowhere else.
DEFAULT_STEPS = 2  # sampling steps of a card that names none (what training writes)
# Tile edge: larger tiles score as 512 px tiles do or better and overlap less; at 1024 px a 20,000 px wide
# raster's blends and a tile's activations took 1.7 GB, at 768 px 1.1 GB.
DEFAULT_TILE = 768
DEFAULT_OVERLAP = 64
RULE_OFF = -1  # band / vocabulary radius that switches the rule off


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class _Check:
    """The card's errors: one IdgbrError that names the file and the field, and says what to do."""

    def __init__(self, where: Path | str) -> None:
        self.where = where

    def bad(self, field: str, problem: str) -> IdgbrError:
        what = f"is invalid: {field} {problem}" if field else problem
        return IdgbrError(f"The model card in {self.where} {what}. The file was edited or damaged: use a model "
                          "written by 'idgbr train', or the bundled model.")

    def whole(self, field: str, value: Any, low: int, high: int) -> int:
        if not _is_int(value) or not low <= value <= high:
            raise self.bad(field, f"is {value!r}; it must be a whole number from {low} to {high}")
        return value

    def number_list(self, field: str, value: Any) -> list[float]:
        if not isinstance(value, list) or not value or not all(_is_number(v) for v in value):
            raise self.bad(field, f"is {value!r}; it must be a list of numbers")
        return list(value)

    def text(self, field: str, value: Any) -> str:
        if not isinstance(value, str):
            raise self.bad(field, f"is {value!r}; it must be a text")
        return value

    def section(self, field: str, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.bad(field, f"is {value!r}, not an object")
        return copy.deepcopy(value)


def _rest(data: dict[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    """The keys of ``data`` this version does not know, kept for writing the card back."""
    return {key: copy.deepcopy(value) for key, value in data.items() if key not in known}


@dataclass
class ClassEntry:
    """One output class: its id in the class raster, its name and its colour (#RRGGBB)."""

    id: int
    name: str
    color: str
    extra: dict[str, Any] = field(default_factory=dict)

    FIELDS = ("id", "name", "color")

    @classmethod
    def from_dict(cls, entry: Any, index: int, num_classes: int, check: _Check) -> ClassEntry:
        where = f"classes[{index}]"
        if not isinstance(entry, dict):
            raise check.bad(where, f"is {entry!r}, not an object with id, name and color")
        class_id = check.whole(f"{where}.id", entry.get("id"), 0, num_classes - 1)
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise check.bad(f"{where}.name", f"is {name!r}; it must be a non-empty text")
        color = entry.get("color")
        if not isinstance(color, str) or not COLOR.match(color):
            raise check.bad(f"{where}.color", f"is {color!r}; it must be a colour such as #1F78B4")
        return cls(class_id, name, color, _rest(entry, cls.FIELDS))

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "color": self.color, **copy.deepcopy(self.extra)}


@dataclass
class Normalization:
    """Per-band mean and standard deviation of the input pixels; the model sees (pixel - mean) / std."""

    mean: list[float]
    std: list[float]
    units: str | None = None  # e.g. "8-bit digital numbers"
    extra: dict[str, Any] = field(default_factory=dict)

    FIELDS = ("mean", "std", "units")

    @classmethod
    def from_dict(cls, norm: Any, check: _Check) -> Normalization:
        if not isinstance(norm, dict):
            raise check.bad("normalization", f"is {norm!r}, not an object with mean and std")
        mean = check.number_list("normalization.mean", norm.get("mean"))
        std = check.number_list("normalization.std", norm.get("std"))
        if len(std) != len(mean):
            raise check.bad("normalization.std", f"has {len(std)} values but normalization.mean has {len(mean)}")
        if any(v <= 0 for v in std):
            raise check.bad("normalization.std", f"is {std}; every value must be above 0 (it divides the pixels)")
        units = norm.get("units")
        if units is not None:
            check.text("normalization.units", units)
        return cls(mean, std, units, _rest(norm, cls.FIELDS))

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"mean": list(self.mean), "std": list(self.std)}
        if self.units is not None:
            data["units"] = self.units
        return {**data, **copy.deepcopy(self.extra)}


@dataclass
class Sampler:
    """The refiner's defaults for a run that does not set them: DDIM steps, strength, noise seed, and the
    never-harm rules (band and vocabulary radius in px, -1 = off; minimum confidence, 0 = off)."""

    steps: int = DEFAULT_STEPS
    strength: float = 1.0
    seed: int = 0
    band: int = RULE_OFF
    vocabulary: int = RULE_OFF
    min_confidence: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    FIELDS = ("steps", "strength", "seed", "band", "vocabulary", "min_confidence")

    @classmethod
    def from_dict(cls, sampler: Any, check: _Check) -> Sampler:
        if not isinstance(sampler, dict):
            raise check.bad("sampler", f"is {sampler!r}, not an object")
        default = cls()

        def whole(key: str, low: int, high: int) -> int:
            return check.whole(f"sampler.{key}", sampler.get(key, getattr(default, key)), low, high)

        steps, seed = whole("steps", MIN_STEPS, MAX_STEPS), whole("seed", 0, MAX_SEED)
        band, vocabulary = whole("band", RULE_OFF, MAX_RULE_PX), whole("vocabulary", RULE_OFF, MAX_RULE_PX)
        strength = sampler.get("strength", default.strength)
        if not _is_number(strength) or not 0 < strength <= 1:
            raise check.bad("sampler.strength", f"is {strength!r}; it must be a number above 0 and at most 1")
        gate = sampler.get("min_confidence", default.min_confidence)
        if not _is_number(gate) or not 0 <= gate <= 1:
            raise check.bad("sampler.min_confidence", f"is {gate!r}; it must be a number from 0 to 1")
        return cls(steps, strength, seed, band, vocabulary, gate, _rest(sampler, cls.FIELDS))

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "strength": self.strength, "seed": self.seed, "band": self.band,
                "vocabulary": self.vocabulary, "min_confidence": self.min_confidence, **copy.deepcopy(self.extra)}


@dataclass
class ModelCard:
    """What a model file says about its model. Built by ``from_dict`` (checked) or in code (training)."""

    num_classes: int
    classes: list[ClassEntry]
    normalization: Normalization
    architecture: dict[str, dict[str, Any]]  # part ("coarse", "refiner") -> its network's config
    name: str = ""
    task: str = "multiclass"  # or "binary"
    bands: list[str] | None = None  # names of the input bands; None: as many as normalization.mean
    bands_default: list[int] | None = None  # 1-based input bands; None: 1..channels
    tile_size: int = DEFAULT_TILE
    overlap: int = DEFAULT_OVERLAP
    size_multiple: int = 1  # tile edges must be a multiple of this
    pixel_size_m: float | None = None  # working resolution; None: idgbr.resolution's default
    pixel_size_range_m: list[float] | None = None  # [min, max]; None: working / 2 to * 2 (idgbr.resolution)
    sampler: Sampler = field(default_factory=Sampler)
    parts: list[str] = field(default_factory=list)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    weights_dtype: str | None = None  # "float16": the file keeps its weights in half precision
    format: str = FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    # The JSON's key order (as training writes it), then the unknown keys.
    FIELDS = ("name", "task", "num_classes", "classes", "bands", "bands_default", "normalization", "tile_size",
              "overlap", "size_multiple", "pixel_size_m", "pixel_size_range_m", "sampler", "architecture", "parts",
              "training", "metrics", "format", "weights_dtype")

    @property
    def channels(self) -> int:
        """How many input bands the model reads."""
        return len(self.normalization.mean)

    def class_dicts(self) -> list[dict[str, Any]]:
        """The classes as JSON objects (id, name, color), for output files and results."""
        return [entry.to_dict() for entry in self.classes]

    @classmethod
    def from_dict(cls, data: Any, where: Path | str | None = None) -> ModelCard:
        """The card of JSON object ``data`` when every field the backend uses is present and sane; else one
        IdgbrError naming ``where`` (the file) and the field. Unknown keys are kept, missing optional ones take
        the defaults above."""
        where = where or "the model file"
        check = _Check(where)
        if not isinstance(data, dict):
            raise check.bad("", f"is a JSON {type(data).__name__}, not an object with the card's fields")
        if data.get("format") != FORMAT:
            raise IdgbrError(f"{where} has model format {data.get('format')!r}; this backend reads {FORMAT!r}. "
                             "Update the plugin or retrain the model.")
        for key in REQUIRED:
            if key not in data:
                raise check.bad(key, "is missing")
        k = check.whole("num_classes", data["num_classes"], 1, MAX_CLASSES)
        classes = _classes(data["classes"], k, check)
        normalization = Normalization.from_dict(data["normalization"], check)
        channels = len(normalization.mean)
        bands = data.get("bands")
        if bands is not None and (not isinstance(bands, list) or len(bands) != channels
                                  or not all(isinstance(b, str) for b in bands)):
            raise check.bad("bands", f"is {bands!r}; it must name the model's {channels} input bands")
        bands_default = data.get("bands_default")
        if bands_default is not None and (not isinstance(bands_default, list) or len(bands_default) != channels
                                          or not all(_is_int(b) and b >= 1 for b in bands_default)):
            raise check.bad("bands_default", f"is {bands_default!r}; it must be {channels} band numbers from 1")
        tile_size = check.whole("tile_size", data.get("tile_size", DEFAULT_TILE), MIN_TILE, MAX_TILE)
        overlap = check.whole("overlap", data.get("overlap", DEFAULT_OVERLAP), 0, tile_size // 2)
        size_multiple = check.whole("size_multiple", data.get("size_multiple", 1), 1, 1024)
        pixel = data.get("pixel_size_m")
        if pixel is not None and (not _is_number(pixel) or pixel <= 0):
            raise check.bad("pixel_size_m", f"is {pixel!r}; it must be a positive number (or null)")
        problem = _range_problem(data.get("pixel_size_range_m"), pixel)
        if problem:
            raise check.bad("pixel_size_range_m", problem)
        task = data.get("task", "multiclass")
        if task not in TASKS:
            raise check.bad("task", f"is {task!r}; it must be 'multiclass' or 'binary'")
        sampler = Sampler.from_dict(data.get("sampler", {}), check)
        architecture = _architecture(data["architecture"], k, channels, where, check)
        name = check.text("name", data.get("name", ""))
        parts = data.get("parts", [])
        if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts):
            raise check.bad("parts", f"is {parts!r}; it must be a list of part names")
        weights_dtype = data.get("weights_dtype")
        if weights_dtype is not None:
            check.text("weights_dtype", weights_dtype)
        given_range = data.get("pixel_size_range_m")
        return cls(
            num_classes=k, classes=classes, normalization=normalization, architecture=architecture, name=name,
            task=task, bands=None if bands is None else list(bands),
            bands_default=None if bands_default is None else list(bands_default), tile_size=tile_size,
            overlap=overlap, size_multiple=size_multiple, pixel_size_m=pixel,
            pixel_size_range_m=None if given_range is None else list(given_range), sampler=sampler,
            parts=list(parts), training=check.section("training", data.get("training", {})),
            metrics=check.section("metrics", data.get("metrics", {})), weights_dtype=weights_dtype,
            extra=_rest(data, cls.FIELDS))

    def to_dict(self) -> dict[str, Any]:
        """The card as JSON: every field (those without a value, None, left out), then the unknown keys."""
        values: dict[str, Any] = {
            "name": self.name, "task": self.task, "num_classes": self.num_classes, "classes": self.class_dicts(),
            "bands": None if self.bands is None else list(self.bands),
            "bands_default": None if self.bands_default is None else list(self.bands_default),
            "normalization": self.normalization.to_dict(), "tile_size": self.tile_size, "overlap": self.overlap,
            "size_multiple": self.size_multiple, "pixel_size_m": self.pixel_size_m,
            "pixel_size_range_m": None if self.pixel_size_range_m is None else list(self.pixel_size_range_m),
            "sampler": self.sampler.to_dict(), "architecture": copy.deepcopy(self.architecture),
            "parts": list(self.parts), "training": copy.deepcopy(self.training),
            "metrics": copy.deepcopy(self.metrics), "format": self.format, "weights_dtype": self.weights_dtype,
        }
        data = {key: values[key] for key in self.FIELDS if values[key] is not None}
        return {**data, **copy.deepcopy(self.extra)}

    def checked(self, where: Path | str | None = None) -> ModelCard:
        """This card read back through ``from_dict``: the same checks for a card built or changed in code."""
        return ModelCard.from_dict(self.to_dict(), where)


CardLike = Union[ModelCard, dict]


def as_card(card: CardLike, where: Path | str | None = None) -> ModelCard:
    """A checked ModelCard from a ModelCard or the card's JSON object."""
    return card.checked(where) if isinstance(card, ModelCard) else ModelCard.from_dict(card, where)


def _classes(classes: Any, k: int, check: _Check) -> list[ClassEntry]:
    if not isinstance(classes, list) or len(classes) != k:
        count = f"lists {len(classes)} classes" if isinstance(classes, list) else f"is {classes!r}"
        raise check.bad("classes", f"{count} but num_classes is {k}")
    entries = [ClassEntry.from_dict(entry, i, k, check) for i, entry in enumerate(classes)]
    ids = sorted(entry.id for entry in entries)
    if ids != list(range(k)):
        raise check.bad("classes", f"has the ids {ids}; they must be 0 to {k - 1}, each once")
    return entries


def _range_problem(given: Any, working: Any) -> str | None:
    """Why ``pixel_size_range_m`` is invalid (None when absent or valid)."""
    if given is None:
        return None
    if not isinstance(given, list) or len(given) != 2 or not all(_is_number(v) for v in given):
        return f"is {given!r}; it must be [min, max] in metres per pixel"
    low, high = given
    if not 0 < low <= high:
        return f"is {given!r}; it must be [min, max] with 0 < min <= max"
    if _is_number(working) and not low <= working <= high:
        return f"is {given!r}; it must contain pixel_size_m {working:g}"
    return None


def _architecture(arch: Any, k: int, channels: int, where: Path | str, check: _Check) -> dict[str, dict[str, Any]]:
    from .models.fcn import FCN_KIND
    from .models.refiner import REFINER_KIND

    if not isinstance(arch, dict) or not ({"coarse", "refiner"} & set(arch)):
        raise check.bad("architecture", "has neither a coarse segmenter nor a refiner")
    for part in ("coarse", "refiner"):
        if part not in arch:
            continue
        spec = arch[part]
        if not isinstance(spec, dict):
            raise check.bad(f"architecture.{part}", f"is {spec!r}, not an object")
        if spec.get("num_classes", k) != k:
            raise check.bad(f"architecture.{part}.num_classes", f"is {spec['num_classes']!r} but num_classes is {k}")
        if spec.get("in_channels", channels) != channels:
            raise check.bad(f"architecture.{part}.in_channels",
                            f"is {spec['in_channels']!r} but normalization has {channels} bands")
    if "refiner" in arch:
        kind = arch["refiner"].get("kind", "idgbr-refiner/1")  # the first refiner's cards named no kind
        if kind != REFINER_KIND:
            raise IdgbrError(f"{where} holds a refiner of kind {kind!r}; this backend runs {REFINER_KIND!r}. A model "
                             "from an earlier version of IDGBR: use the bundled models or retrain its refiner "
                             "('idgbr train refiner'); a newer one: update the plugin.")
    kind = arch.get("coarse", {}).get("kind", "coarse")
    if kind not in ("coarse", FCN_KIND):
        raise check.bad("architecture.coarse.kind", f"is {kind!r}; this backend builds the default segmenter or "
                                                    f"{FCN_KIND!r}")
    return copy.deepcopy(arch)
