"""The model card in docs/ describes the bundled models as they ship: rendered from the validation results
in docs/validation/, with the sampler defaults that the model files carry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from idgbr.checkpoint import read_card

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("dubai5", "roads2", "buildings2")


@pytest.mark.parametrize("name", MODELS)
def test_each_bundled_model_ships_the_defaults_its_validation_chose(name: str):
    summary = json.loads((ROOT / "docs" / "validation" / f"{name}.json").read_text())
    sampler = read_card(ROOT / "resources" / "models" / f"{name}.safetensors").sampler
    chosen = summary["defaults"]
    assert (sampler.steps, sampler.band, sampler.vocabulary, sampler.min_confidence) == \
        (chosen["steps"], chosen["band"], chosen["vocabulary"], chosen["min_confidence"])


def test_the_model_card_is_rendered_from_the_shipped_results(tmp_path: Path):
    out = tmp_path / "MODEL_CARD.md"
    summaries = [str(ROOT / "docs" / "validation" / f"{name}.json") for name in MODELS]
    subprocess.run([sys.executable, str(ROOT / "tools" / "model_card.py"), *summaries, "--models",
                    str(ROOT / "resources" / "models"), "--intro", str(ROOT / "docs" / "model_card_intro.md"),
                    "--out", str(out)], check=True, capture_output=True)
    assert out.read_text() == (ROOT / "docs" / "MODEL_CARD.md").read_text(), \
        "docs/MODEL_CARD.md is stale: run tools/model_card.py on docs/validation/*.json"
