"""Model files: round trip, and clear errors for missing, truncated, foreign and mismatched files."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
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


def test_half_precision_weights_halve_the_file_and_load_as_float32(tmp_path):
    tensors, card = load_checkpoint(default_model_path())
    full, half = tmp_path / "full.safetensors", tmp_path / "half.safetensors"
    save_checkpoint(full, tensors, dataclasses.replace(card, weights_dtype="float32"))
    save_checkpoint(half, tensors, dataclasses.replace(card, weights_dtype="float16"))
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded, _ = load_checkpoint(half)
    floats = [k for k, v in tensors.items() if v.is_floating_point()]
    assert floats and all(loaded[k].dtype == torch.float32 for k in floats)
    assert all(torch.allclose(loaded[k], tensors[k], rtol=1e-3, atol=1e-4) for k in floats)


def test_bundled_models_are_shipped_in_half_precision():
    for path in bundled_models().values():
        assert read_card(path).weights_dtype == "float16", path


def test_bundled_models_have_complete_cards():
    models = bundled_models()
    assert {"dubai5", "roads2", "buildings2"} <= set(models)
    for name, expected in (("dubai5", 5), ("roads2", 2)):
        card = read_card(models[name])
        assert card.num_classes == expected == len(card.classes)
        assert card.parts == ["coarse", "refiner"]
        assert card.bands is not None and len(card.normalization.mean) == len(card.bands) == 3
        # Every sampler default is the file's own, not the backend's fallback.
        with safe_open(str(models[name]), framework="pt") as handle:
            written = json.loads(handle.metadata()["idgbr_card"])["sampler"]
        assert {"steps", "strength", "seed", "band", "vocabulary", "min_confidence"} <= set(written)
        assert all(c.color.startswith("#") and len(c.color) == 7 for c in card.classes)
    assert read_card(models["dubai5"]).classes[2].name == "road"


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
    card.architecture["refiner"]["denoiser_widths"] = [8, 8, 8]
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


def _card() -> dict:
    return read_card(default_model_path()).to_dict()


def _write_card(path, card) -> None:
    """A model file with the bundled weights and CARD (any JSON) as its card, written as-is."""
    tensors, _ = load_checkpoint(default_model_path())
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"idgbr_card": json.dumps(card)})


def _edit(change):
    def edit(card: dict) -> dict:
        change(card)
        return card
    return edit


@pytest.mark.parametrize(("edit", "field"), [
    (lambda card: [card], "is a JSON list, not an object"),
    (_edit(lambda c: c.update(num_classes=0)), "num_classes is 0"),
    (_edit(lambda c: c.update(num_classes=300)), "num_classes is 300"),
    (_edit(lambda c: c.update(num_classes=7)), "classes lists 5 classes but num_classes is 7"),
    (_edit(lambda c: c.update(classes=c["classes"][:3])), "classes lists 3 classes but num_classes is 5"),
    (_edit(lambda c: c.update(num_classes=7, classes=c["classes"] + [
        {"id": 5, "name": "snow", "color": "#FFFFFF"}, {"id": 6, "name": "ice", "color": "#EEEEEE"}])),
     "architecture.coarse.num_classes is 5 but num_classes is 7"),
    (_edit(lambda c: c["classes"][2].update(color="blue")), "classes[2].color is 'blue'"),
    (_edit(lambda c: c["classes"][1].update(id=3)), "classes has the ids [0, 2, 3, 3, 4]"),
    (_edit(lambda c: c["normalization"].update(std=[79.3, 0, 80.8])), "normalization.std"),
    (_edit(lambda c: c.pop("normalization")), "normalization is missing"),
    (_edit(lambda c: c.pop("classes")), "classes is missing"),
    (_edit(lambda c: c["sampler"].update(steps=0)), "sampler.steps is 0"),
    (_edit(lambda c: c["sampler"].update(min_confidence=2)), "sampler.min_confidence is 2"),
    (_edit(lambda c: c.update(architecture={})), "architecture has neither a coarse segmenter nor a refiner"),
])
def test_invalid_cards_are_refused_naming_the_file_and_the_field(tmp_path, edit, field):
    path = tmp_path / "edited.safetensors"
    _write_card(path, edit(_card()))
    for load in (read_card, load_checkpoint, load_bundle):
        with pytest.raises(IdgbrError) as error:
            load(path)
        message = str(error.value)
        assert str(path) in message and field in message, message
        assert "Traceback" not in message


def test_a_refiner_of_another_kind_is_refused_by_name(tmp_path):
    path = tmp_path / "old.safetensors"
    card = _card()
    card["architecture"]["refiner"]["kind"] = "idgbr-refiner/1"
    _write_card(path, card)
    with pytest.raises(IdgbrError, match="refiner of kind 'idgbr-refiner/1'; this backend runs 'idgbr-refiner/2'"):
        load_bundle(path)


def test_a_card_edited_in_memory_is_checked_when_the_bundle_is_built():
    tensors, card = load_checkpoint(default_model_path())
    card.normalization.std[0] = 0
    with pytest.raises(IdgbrError, match="normalization.std"):
        build_bundle(tensors, card, torch.device("cpu"))


def test_cards_from_training_without_the_newer_sampler_keys_are_accepted(tmp_path):
    """Cards that `idgbr train` writes before validation chose the rules (no band, vocabulary, min confidence)."""
    path = tmp_path / "fresh.safetensors"
    card = _card()
    card["sampler"] = {"steps": 2, "strength": 1.0, "guard_band": 0, "seed": 0}
    _write_card(path, card)
    assert read_card(path).sampler.steps == 2
