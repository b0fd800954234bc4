"""The model card: one typed, checked form of the JSON each model file carries, read and written in one place,
with one set of defaults for what a card leaves out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from idgbr.card import DEFAULT_STEPS, ModelCard, Sampler
from idgbr.checkpoint import CARD_KEY, describe, load_checkpoint, read_card, save_checkpoint
from idgbr.cli import main as cli_main
from idgbr.errors import IdgbrError
from idgbr.model_bundle import bundled_models, load_bundle
from idgbr.pipeline import RunOptions, run
from idgbr.train import base_card


def _raw(path: Path) -> dict:
    """The card's JSON as the file holds it."""
    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()[CARD_KEY])


def _write_raw(path: Path, source: Path, data: dict) -> Path:
    """A model file with SOURCE's weights and DATA written as its card, unchecked (as a hand-edited file)."""
    tensors, _ = load_checkpoint(source)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={CARD_KEY: json.dumps(data)})
    return path


def test_the_shipped_cards_round_trip_exactly():
    models = bundled_models()
    assert {"dubai5", "roads2", "buildings2"} <= set(models)
    for name, path in models.items():
        data = _raw(path)
        card = ModelCard.from_dict(data, path)
        assert json.dumps(card.to_dict()) == json.dumps(data), name  # same keys, order and values
        assert card.name == name and card.num_classes == len(card.classes)


def test_unknown_keys_survive_a_read_and_a_write(bundled_model, tmp_path):
    tensors, card = load_checkpoint(bundled_model)
    data = {**card.to_dict(), "licence": "CC-BY-4.0"}
    data["sampler"]["guard_band"] = 0
    data["classes"][0]["description"] = "open water"
    data["normalization"]["source"] = "Dubai tiles 1-6"
    out = tmp_path / "extra.safetensors"
    save_checkpoint(out, tensors, data)
    assert _raw(out) == data
    again = read_card(out)
    assert again.extra == {"licence": "CC-BY-4.0"} and again.sampler.extra == {"guard_band": 0}
    assert again.classes[0].extra == {"description": "open water"}
    assert again.to_dict() == data


def _edit(change):
    def edit(data: dict) -> dict:
        change(data)
        return data
    return edit


@pytest.mark.parametrize(("edit", "message"), [
    (_edit(lambda d: d.pop("num_classes")), "is invalid: num_classes is missing"),
    (_edit(lambda d: d["classes"][1].update(color="red")),
     "is invalid: classes[1].color is 'red'; it must be a colour such as #1F78B4"),
    (_edit(lambda d: d["classes"][1].update(color="#12345")), "is invalid: classes[1].color is '#12345'"),
    (_edit(lambda d: d["sampler"].update(steps=0)), "is invalid: sampler.steps is 0; it must be a whole number "
                                                    "from 1 to 100"),
    (_edit(lambda d: d["sampler"].update(steps=2.5)), "is invalid: sampler.steps is 2.5"),
    (_edit(lambda d: d["sampler"].update(steps=101)), "is invalid: sampler.steps is 101"),
    (_edit(lambda d: d["sampler"].update(band=-2)), "is invalid: sampler.band is -2"),
    (_edit(lambda d: d["sampler"].update(strength=0)), "is invalid: sampler.strength is 0"),
    (_edit(lambda d: d.update(sampler="fast")), "is invalid: sampler is 'fast', not an object"),
    (_edit(lambda d: d.update(tile_size=512, overlap=300)),
     "is invalid: overlap is 300; it must be a whole number from 0 to 256"),
    (_edit(lambda d: d.update(task="regression")), "is invalid: task is 'regression'"),
    (_edit(lambda d: d.update(name=5)), "is invalid: name is 5; it must be a text"),
    (_edit(lambda d: d.update(training=[])), "is invalid: training is [], not an object"),
])
def test_a_bad_card_is_refused_naming_the_file_and_the_field(bundled_model, tmp_path, edit, message):
    path = _write_raw(tmp_path / "edited.safetensors", bundled_model, edit(read_card(bundled_model).to_dict()))
    with pytest.raises(IdgbrError) as error:
        read_card(path)
    text = str(error.value)
    assert message in text and str(path) in text, text
    with pytest.raises(IdgbrError, match="the model file is invalid"):
        ModelCard.from_dict(_raw(path))  # no file named: the message still reads


def test_a_card_of_another_format_is_refused():
    data = {"format": "idgbr-bundle/2", "num_classes": 2}
    with pytest.raises(IdgbrError, match="has model format 'idgbr-bundle/2'; this backend reads 'idgbr-bundle/1'"):
        ModelCard.from_dict(data, "new.safetensors")


def test_an_invalid_card_is_never_written(bundled_model, tmp_path):
    tensors, card = load_checkpoint(bundled_model)
    card.sampler.steps = 0
    out = tmp_path / "bad.safetensors"
    with pytest.raises(IdgbrError, match="sampler.steps is 0"):
        save_checkpoint(out, tensors, card)
    assert not list(tmp_path.iterdir())


def test_a_card_without_a_sampler_gets_the_one_set_of_defaults(bundled_model, crop_raster, tmp_path, capsys):
    """Reading, the model, a run and 'idgbr info' all take the same defaults: 2 steps, every rule off."""
    data = read_card(bundled_model).to_dict()
    del data["sampler"]
    path = _write_raw(tmp_path / "plain.safetensors", bundled_model, data)

    card = read_card(path)
    assert card.sampler == Sampler() and card.sampler.steps == DEFAULT_STEPS == 2
    assert (card.sampler.band, card.sampler.vocabulary, card.sampler.min_confidence) == (-1, -1, 0.0)
    assert load_bundle(path, "cpu").card.sampler == Sampler()
    assert base_card("new", "roads", [100.0] * 3, [50.0] * 3).sampler.steps == DEFAULT_STEPS

    result = run(RunOptions(input=crop_raster(32, 32), output=tmp_path / "out.tif", model=path, device="cpu"))
    assert result.steps == DEFAULT_STEPS
    assert (result.band, result.vocabulary, result.min_confidence) == (-1, -1, 0.0)

    assert cli_main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{DEFAULT_STEPS} DDIM steps" in out and "band off, vocabulary off, min confidence off" in out
    assert describe(card) in out


def test_a_card_changed_in_code_is_checked_again_when_used(bundled_model):
    tensors, card = load_checkpoint(bundled_model)
    card.classes[0].color = "blue"
    with pytest.raises(IdgbrError, match=r"classes\[0\].color is 'blue'"):
        card.checked()
