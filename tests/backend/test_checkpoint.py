"""Model files: round trip, and clear errors for missing, truncated, foreign and mismatched files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from idgbr.checkpoint import load_checkpoint, read_card, save_checkpoint
from idgbr.cli import main as cli_main
from idgbr.errors import IdgbrError
from idgbr.model_bundle import build_bundle, bundled_models, default_model_path, load_bundle


def test_round_trip_keeps_weights_and_card(tmp_path):
    tensors, card = load_checkpoint(default_model_path())
    out = tmp_path / "copy.safetensors"
    save_checkpoint(out, tensors, card)
    tensors2, card2 = load_checkpoint(out)
    assert card2 == card
    assert tensors2.keys() == tensors.keys()
    assert all(torch.equal(tensors[k], tensors2[k]) for k in tensors)
    assert not list(tmp_path.glob("*.tmp"))


def test_bundled_models_have_complete_cards():
    models = bundled_models()
    assert {"dubai5", "roads2"} <= set(models)
    for name, expected in (("dubai5", 5), ("roads2", 2)):
        card = read_card(models[name])
        assert card["num_classes"] == expected == len(card["classes"])
        assert card["parts"] == ["coarse", "refiner"]
        assert len(card["normalization"]["mean"]) == len(card["bands"]) == 3
        assert {"steps", "strength", "seed", "band", "vocabulary", "min_confidence"} <= set(card["sampler"])
        assert all(c["color"].startswith("#") and len(c["color"]) == 7 for c in card["classes"])
    assert read_card(models["dubai5"])["classes"][2]["name"] == "road"


def test_missing_file_names_the_path():
    with pytest.raises(IdgbrError, match="not found"):
        load_bundle("/nonexistent/model.safetensors")


def test_truncated_file_is_reported(tmp_path):
    data = default_model_path().read_bytes()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(IdgbrError, match="truncated|readable"):
        load_bundle(broken)


def test_random_bytes_are_not_a_model(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01not a model at all" * 100)
    with pytest.raises(IdgbrError, match="not a readable model file"):
        load_bundle(junk)


def test_foreign_safetensors_file_is_refused(tmp_path):
    foreign = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, str(foreign))
    with pytest.raises(IdgbrError, match="not an IDGBR model"):
        load_bundle(foreign)


def test_weights_that_do_not_match_the_card_are_refused():
    tensors, card = load_checkpoint(default_model_path())
    card = json.loads(json.dumps(card))
    card["architecture"]["refiner"]["denoiser_widths"] = [8, 8, 8]
    with pytest.raises(IdgbrError, match="do not match"):
        build_bundle(tensors, card, torch.device("cpu"))


def test_info_prints_classes_and_sampler(capsys):
    assert cli_main(["info", "roads2"]) == 0
    out = capsys.readouterr().out
    assert "road" in out and "DDIM" in out
    assert "rules" in out and "band " in out and "vocabulary " in out and "min confidence " in out


def test_rules_in_words():
    from idgbr.checkpoint import rules_text

    assert rules_text(8, -1, 0.5) == "band 8 px, vocabulary off, min confidence 0.5"
    assert rules_text(None, 0, 0.0) == "band off, vocabulary 0 px, min confidence off"
