"""Every field is declared once, and everything derived from the declarations agrees.

The page's components, the API's signature, validation, the recipe, its restore and the
README's table all come from `pipelines.fields` (laid out by `pipelines.form`). These tests
walk the declarations themselves, so a field added later is covered without a new test.
"""

from __future__ import annotations

import pytest
from conftest import ROOT
from gradio_client import handle_file

from pipelines.errors import InvalidRequestError, StencilError
from pipelines.fields import REQUEST_FIELDS, Field
from pipelines.form import (
    TABLE_END,
    TABLE_START,
    FormField,
    form_fields,
    parameter_table,
    parse_form,
)

HOUSE = str(ROOT / "examples" / "house.png")
TINY_FACTS = {"text_encoder_layers": 2}


def sliders(fields) -> list[FormField]:
    return [item for item in fields if item.spec.page_widget == "slider"]


@pytest.mark.parametrize("item", sliders(form_fields(TINY_FACTS)), ids=lambda item: item.key)
def test_every_value_a_slider_offers_is_accepted_and_none_beyond(item):
    spec = item.spec
    offered = spec.page_values()
    assert offered[0] == spec.minimum and offered[-1] == spec.maximum
    for value in offered:
        spec.parse(value)  # the server accepts everything the page can send
    for beyond in (spec.minimum - spec.step, spec.maximum + spec.step):
        with pytest.raises(InvalidRequestError, match=item.key):
            spec.parse(beyond)


def test_the_page_offers_clip_skip_only_as_deep_as_the_loaded_text_encoder():
    by_key = {item.key: item.spec for item in form_fields(TINY_FACTS)}
    assert by_key["clip_skip"].maximum == 2
    assert {item.key: item.spec for item in form_fields()}["clip_skip"].maximum == 12


def test_a_unit_field_error_names_the_unit_it_came_from():
    fields = form_fields(TINY_FACTS)
    with pytest.raises(InvalidRequestError, match=r"conditioning_scale_2=9\.0"):
        parse_form(fields, {"control_type_2": "canny", "conditioning_scale_2": 9.0})
    with pytest.raises(InvalidRequestError, match="canny_low_threshold_2=0"):
        parse_form(fields, {"control_type_2": "canny", "canny_low_threshold_2": 0})
    with pytest.raises(InvalidRequestError, match="stepz"):
        parse_form(fields, {"stepz": 3})


def test_a_field_whose_default_it_refuses_cannot_be_declared():
    with pytest.raises(InvalidRequestError, match="steps=0"):
        Field("steps", "Steps", "int", 0, minimum=1, maximum=10, step=1)


def test_the_readme_parameter_table_is_the_declared_one():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert TABLE_START in readme and TABLE_END in readme, "run scripts/write_parameter_table.py"
    written = readme.split(TABLE_START)[1].split(TABLE_END)[0].strip()
    assert written == parameter_table(form_fields()).strip(), (
        "README's parameter table is stale: run scripts/write_parameter_table.py"
    )
    for spec in REQUEST_FIELDS:
        assert f"| `{spec.name}` |" in written


# ---- page -> API -> recipe PNG -> restore, for every declared field ------------------------


def _other_value(item: FormField):
    """A value the field accepts that is not its default (None: leave the field out)."""
    spec = item.spec
    if spec.page_widget == "slider":
        target = spec.minimum + (spec.maximum - spec.minimum) * 0.3
        candidates = [v for v in spec.page_values() if v != spec.default]
        return min(candidates, key=lambda v: abs(v - target))
    if spec.kind == "choice":
        return next(choice for choice in spec.choices if choice != spec.default)
    if spec.kind == "bool":
        return not spec.default
    return None


CHOSEN_CONTROL = {1: "canny", 2: "image"}


def every_field_changed() -> dict:
    """A value for every declared field other than its default; the unit fields for a canny
    unit and an "image" unit (so both units' own parameters are changed too)."""
    chosen_control = CHOSEN_CONTROL
    values: dict = {
        "prompt": "a lighthouse at dusk",
        "negative_prompt": "blurry",
        "loras": "tiny-ink:0.5",
        "seed": 1234,
        "width": 64,
        "height": 48,
        "steps": 2,
        "num_images": 2,
    }
    for item in form_fields(TINY_FACTS):
        if item.key in values or item.spec.kind in ("image", "text"):
            continue
        if item.unit is not None:
            if item.declared.name == "control_type":
                values[item.key] = chosen_control[item.unit]
                continue
            if item.is_param and item.control != chosen_control[item.unit]:
                continue
        value = _other_value(item)
        if value is not None:
            values[item.key] = value
    for position, s in ((1, ""), (2, "_2")):
        values[f"control_image{s}"] = handle_file(HOUSE)
        values[f"control_resolution{s}"] = 128  # small: the map is made on the CPU
        values[f"guidance_start{s}"], values[f"guidance_end{s}"] = 0.1 * position, 0.7
    return values


def test_every_declared_field_round_trips_through_the_api_the_png_and_restore(client):
    sent = every_field_changed()
    left_out = [f for f in form_fields(TINY_FACTS) if f.key not in sent]
    # Only other controls' parameters may be left out (a unit runs one control).
    for item in left_out:
        assert item.is_param and item.control != CHOSEN_CONTROL[item.unit], item.key
    gallery, _maps, _seed, recipe, _snippet, _preview = client.predict(**sent, api_name="/generate")
    assert len(gallery) == 2
    second = gallery[1]["image"] if isinstance(gallery[1], dict) else gallery[1]
    restored = client.predict(handle_file(second), api_name="/restore_recipe")
    # Each image's recipe makes that image alone: its own seed, one image.
    expected = {key: value for key, value in sent.items() if not key.startswith("control_image")}
    expected.update(seed=sent["seed"] + 1, num_images=1)
    assert {key: restored.get(key) for key in expected} == expected
    assert recipe["clip_skip"] == sent["clip_skip"]


def test_restoring_a_png_without_a_recipe_names_the_file(client, tmp_path):
    from gradio_client.exceptions import AppError
    from PIL import Image

    plain = tmp_path / "holiday.png"
    Image.new("RGB", (8, 8)).save(plain)
    with pytest.raises(AppError, match="recipe_image='holiday.png' .* no Stencil recipe"):
        client.predict(handle_file(str(plain)), api_name="/restore_recipe")


def test_the_service_parses_inside_its_methods_so_every_error_is_typed(engine, tmp_path):
    from pipelines.service import StencilService

    service = StencilService(engine, output_dir=tmp_path)
    bad = [
        {"prompt": "x", "control_resolution": 512.5, "control_type": "canny"},
        {"prompt": "x", "control_type": "canny"},  # no image
        {"prompt": "x", "width": "wide"},
        {"prompt": "x", "clip_skip": 3},
    ]
    for values in bad:
        with pytest.raises(StencilError):
            service.build_request(values)
