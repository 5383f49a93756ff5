"""The page's own helpers: size presets per family, and what a LoRA slot shows and sets."""

from __future__ import annotations

from pathlib import Path

import pytest

import ui
from pipelines.families import FAMILIES
from pipelines.fields import LORA_WEIGHT, SIZE_MULTIPLE
from pipelines.loras import load_catalogue

SHIPPED = Path(__file__).resolve().parent.parent / "loras"


@pytest.fixture(scope="module")
def entries() -> list[dict]:
    return [entry.to_public_dict() for entry in load_catalogue(SHIPPED).values()]


def test_the_family_size_comes_from_the_status():
    assert ui.family_shape({"family": "sd15", "label": "Stable Diffusion 1.5"}) == (512, "sd")
    assert ui.family_shape({"family": "sdxl", "label": "Stable Diffusion XL"}) == (1024, "sdxl")
    tiny_size = FAMILIES["tiny"].default_size
    assert ui.family_shape({"family": "tiny", "label": "x"}) == (tiny_size, "sd")
    assert ui.family_shape({"family": "tiny-xl", "label": "x"}) == (64, "sdxl")
    # A local folder: not in the registry, told apart by its status.
    folder = {"family": "sdxl:mine", "label": "Stable Diffusion XL (mine)", "architecture": "sdxl"}
    assert ui.family_shape(folder) == (1024, "sdxl")
    unsaid = {"family": "my-folder", "label": "SDXL (local folder)"}  # an older status
    assert ui.family_shape(unsaid) == (1024, "sdxl")
    assert ui.family_shape({"family": "my-folder", "label": "SD (local folder)"}) == (512, "sd")


def test_size_presets_per_family():
    sd15 = [value for _, value in ui.size_presets(512)]
    assert sd15[0] == ui.AUTO_PRESET
    assert {"512x512", "512x768", "768x512", "640x448"} <= set(sd15)
    sdxl = [value for _, value in ui.size_presets(1024, "sdxl")]
    assert {"1024x1024", "832x1216", "1216x832", "1152x896"} <= set(sdxl)
    tiny_xl = [value for _, value in ui.size_presets(64, "sdxl")]
    assert len(set(tiny_xl)) == len(tiny_xl) and "64x64" in tiny_xl
    labels = dict((value, label) for label, value in ui.size_presets(512))
    assert labels["512x768"] == "512 × 768 (portrait)"
    for size, architecture in ((64, "sd"), (512, "sd"), (64, "sdxl"), (1024, "sdxl")):
        for _, value in ui.size_presets(size, architecture)[1:]:
            width, height = (int(side) for side in value.split("x"))
            assert width % SIZE_MULTIPLE == 0 and height % SIZE_MULTIPLE == 0
            assert width > 0 and height > 0


def test_a_preset_sets_both_sliders():
    assert ui.apply_size_preset("832x1216") == (832, 1216)
    assert ui.apply_size_preset(ui.AUTO_PRESET) == (0, 0)
    width, height = ui.apply_size_preset(None)
    assert width.get("__type__") == "update" and height.get("__type__") == "update"


def test_picking_a_lora_sets_its_catalogue_default_weight(entries):
    by_name = {entry["name"]: entry for entry in entries}
    assert by_name["tiny-neon"]["default_weight"] == 0.8  # the shipped catalogue's value
    assert ui.lora_default_weight(entries, "tiny-neon") == 0.8
    assert ui.lora_default_weight(entries, "tiny-ink") == 1.0
    # None picked, or a name no longer listed: the weight stays as it is.
    for name in ("", None, "not-a-lora"):
        assert ui.lora_default_weight(entries, name).get("__type__") == "update"
    heavy = [{**by_name["tiny-ink"], "default_weight": LORA_WEIGHT.maximum + 5}]
    assert ui.lora_default_weight(heavy, "tiny-ink") == LORA_WEIGHT.maximum


def test_a_slot_shows_what_its_lora_is_and_the_tag_to_type(entries):
    neon = next(entry for entry in entries if entry["name"] == "tiny-neon")
    shown = ui.lora_slot_markdown(entries, "tiny-neon", 0.8)
    assert neon["description"] in shown
    assert neon["licence"] in shown
    for word in neon["trigger_words"]:
        assert f"`{word}`" in shown
    assert "`<lora:tiny-neon:0.8>`" in shown
    assert "`<lora:tiny-neon:1.25>`" in ui.lora_slot_markdown(entries, "tiny-neon", 1.25)
    assert ui.lora_slot_markdown(entries, "", 1.0) == ""
    bare = [{"name": "bare", "display_name": "Bare", "trigger_words": [], "licence": ""}]
    assert "not stated" in ui.lora_slot_markdown(bare, "bare", 1)
    assert "**Trigger words:** none" in ui.lora_slot_markdown(bare, "bare", 1)


GALLERY = [
    {"image": {"path": "/outputs/a.png"}, "caption": "seed 1 · 64×64"},
    {"image": {"path": "/outputs/b.png"}, "caption": "seed 2 · 64×64"},
]
RECIPE = {
    "controls": [
        {"control_type": "pose", "params": {}},
        {"control_type": "image", "params": {"map_type": "depth"}},
    ]
}


def test_a_result_goes_to_a_unit_as_its_photo():
    assert ui.result_for_unit(GALLERY, 1) == "/outputs/b.png"
    assert ui.result_for_unit(GALLERY, None) == "/outputs/a.png"  # nothing picked: the first
    assert ui.result_for_unit([("/outputs/c.png", "caption")], 0) == "/outputs/c.png"
    assert ui.result_for_unit([], 0).__class__ is not str  # no result yet: nothing changes


def test_a_map_goes_to_a_unit_as_its_own_map_with_its_type():
    # A pose map arrives as "use my image as the map" of type pose...
    assert ui.map_for_unit(GALLERY, 0, RECIPE) == ("/outputs/a.png", "image", "pose")
    # ...and a map the user drew keeps the type it was given.
    assert ui.map_for_unit(GALLERY, 1, RECIPE) == ("/outputs/b.png", "image", "depth")
    assert all(part.__class__ is not str for part in ui.map_for_unit(None, 0, RECIPE))


def test_an_error_names_the_unit_and_field_as_the_page_labels_them():
    from pipelines.form import form_fields

    fields = form_fields({"text_encoder_layers": 2})
    text = ui.error_box_text("control_image_2: the image is empty (0 bytes)", fields)
    assert "**Control 2 · Control image**: control_image_2: the image is empty" in text
    text = ui.error_box_text("steps=500 is not allowed: at most 150", fields)
    assert "**Steps**: steps=500" in text
    # A message about no one field is shown as it is.
    assert "Not generated. unknown LoRA 'nope'" in ui.error_box_text("unknown LoRA 'nope'", fields)


def test_the_history_keeps_each_result_once_newest_first_and_bounded():
    history, state = ui.add_to_history(GALLERY, [])
    assert (
        history
        == state
        == [("/outputs/a.png", "seed 1 · 64×64"), ("/outputs/b.png", "seed 2 · 64×64")]
    )
    again, _ = ui.add_to_history(GALLERY, history)  # the same results again: nothing new
    assert again == history
    newer = [{"image": {"path": f"/outputs/{n}.png"}, "caption": ""} for n in range(30)]
    history, _ = ui.add_to_history(newer, history)
    assert len(history) == ui.HISTORY_SIZE and history[0][0] == "/outputs/0.png"
