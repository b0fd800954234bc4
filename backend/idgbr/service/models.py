"""What the service knows about models and the compute device: model cards, warm bundles, torch device."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from idgbr.card import ModelCard
from idgbr.errors import IdgbrError


def read_card(path: Path) -> ModelCard:
    """The model card of a bundle, read from the file header only (no weights are loaded)."""
    from idgbr.checkpoint import read_card as checkpoint_card

    return checkpoint_card(path)


class ModelCatalog:
    """Bundled models and their cards; cards are re-read only when a file changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cards: Dict[Path, Tuple[Tuple[float, int], ModelCard]] = {}

    def bundled(self) -> Dict[str, Path]:
        from idgbr.model_bundle import bundled_models

        return dict(bundled_models())

    def card(self, path: Path) -> ModelCard:
        stat = path.stat()
        key = (stat.st_mtime, stat.st_size)
        with self._lock:
            cached = self._cards.get(path)
            if cached is not None and cached[0] == key:
                return cached[1]
        card = read_card(path)
        with self._lock:
            self._cards[path] = (key, card)
        return card

    def check(self, path: Optional[Path]) -> None:
        """IdgbrError when the card of model file PATH (None: the default model) is unusable; a missing file is
        left to the job, whose error says what to do."""
        from idgbr.model_bundle import default_model_path

        target = path if path is not None else default_model_path()
        if target.is_file():
            self.card(target)

    def listing(self) -> List[Dict[str, Any]]:
        """One entry per bundled model: name, path, and its card or the error that kept it from loading."""
        entries = []
        for name, path in sorted(self.bundled().items()):
            entry: Dict[str, Any] = {"name": name, "path": str(path), "available": False, "card": None,
                                     "error": None}
            try:
                entry["card"] = self.card(path).to_dict()
                entry["available"] = True
            except (IdgbrError, OSError) as exc:
                entry["error"] = str(exc)
            entries.append(entry)
        return entries

    def resolve(self, model: Optional[str]) -> Optional[Path]:
        """A job's `model` field (a bundled model name or a .safetensors path) as a path; None = the default."""
        if model is None:
            return None
        bundled = self.bundled()
        if model in bundled:
            return bundled[model]
        path = Path(model)
        if path.suffix.lower() == ".safetensors" and path.is_absolute():
            if not path.is_file():
                raise IdgbrError(f"model file {model} does not exist: check the path")
            return path
        names = ", ".join(sorted(bundled)) or "none installed"
        raise IdgbrError(
            f"unknown model {model!r}: use a bundled model name ({names}) or an absolute path to a .safetensors bundle"
        )


class BundleCache:
    """Loaded bundles kept between jobs, so only the first job with a model pays for loading it.

    `load` has the signature of idgbr.model_bundle.load_bundle. A file that changes on disk is loaded again.
    Only the job worker thread loads; the lock guards the listing read by /health.
    """

    def __init__(self, capacity: int = 2) -> None:
        self.capacity = capacity  # bundles are small, but each holds device memory
        self._lock = threading.Lock()
        self._items: OrderedDict[Tuple[str, int, int, str], Tuple[Any, float]] = OrderedDict()

    def load(self, path: Optional[Any] = None, device: str = "auto") -> Any:
        from idgbr.model_bundle import load_bundle, resolve_model_path

        source = resolve_model_path(path)
        try:
            stat = source.stat()
            key = (str(source.resolve()), stat.st_mtime_ns, stat.st_size, str(device or "auto"))
        except OSError:
            return load_bundle(path, device)  # missing or unreadable: its own error message says what to do
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items[key] = (hit[0], time.time())
                self._items.move_to_end(key)
                return hit[0]
        bundle = load_bundle(source, device)
        with self._lock:
            for old in [k for k in self._items if k[0] == key[0] and k[3] == key[3]]:
                del self._items[old]  # an older version of the same file
            self._items[key] = (bundle, time.time())
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return bundle

    def listing(self) -> List[Dict[str, Any]]:
        with self._lock:
            return [{"name": bundle.card.name or Path(key[0]).stem, "path": key[0],
                     "device": str(bundle.device), "last_used": used}
                    for key, (bundle, used) in self._items.items()]


_device_lock = threading.Lock()
_device_info: Optional[Dict[str, Any]] = None


def device_info() -> Dict[str, Any]:
    """torch version and the device 'auto' picks, with the reason when it is the CPU. Computed once."""
    global _device_info
    with _device_lock:
        if _device_info is None:
            _device_info = _probe_device()
        return dict(_device_info)


def _probe_device() -> Dict[str, Any]:
    import torch

    info: Dict[str, Any] = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                            "cuda_available": False, "device": "cpu", "device_name": None, "device_reason": None}
    try:
        cuda = torch.cuda.is_available()
    except Exception as exc:  # a broken driver install raises here; report it instead of failing /health
        cuda = False
        info["device_reason"] = f"torch.cuda.is_available() raised {type(exc).__name__}: {exc}"
    if cuda:
        info.update(cuda_available=True, device="cuda", device_name=torch.cuda.get_device_name(0))
        return info
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        info.update(device="mps", device_name="Apple Metal (MPS)")
        return info
    if info["device_reason"] is None:
        if torch.version.cuda is None:
            info["device_reason"] = (
                "torch.cuda.is_available() is False: this torch build has no CUDA support "
                "(install a CUDA build of torch to use an NVIDIA GPU)"
            )
        else:
            info["device_reason"] = (
                f"torch.cuda.is_available() is False: torch is built for CUDA {torch.version.cuda} "
                "but no usable NVIDIA GPU or driver was found"
            )
    return info
