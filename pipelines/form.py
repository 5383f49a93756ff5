"""The page's and the API's flat list of fields, derived from the declarations.

The page and the API name every value on one level: `steps`, `conditioning_scale_2`,
`canny_low_threshold`. This module lays the declared fields (`pipelines.fields`) and the
preprocessors' parameters (the control registry) out under those names, parses a set of
such values into request values, turns a recipe back into them, and writes the README's
parameter table. The UI, the API signature and the service all use this one layout.

Imports neither torch nor gradio.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .errors import InvalidRequestError, StencilError
from .fields import LORA_WEIGHT, NO_CONTROL, REQUEST_FIELDS, Field, unit_fields

CONTROL_UNITS = 2


def suffix(position: int) -> str:
    """The second unit's names end in "_2"; the first unit's have no ending."""
    return "" if position == 1 else f"_{position}"


@dataclass(frozen=True)
class FormField:
    """One declared field under the name the page and the API give it."""

    key: str
    spec: Field  # named `key`, so its errors name what the caller sent
    unit: int | None = None  # 1-based control unit; None for the request's own fields
    control: str | None = None  # set for a preprocessor parameter: the control it serves
    source: Field | None = None  # the declaration as written (unsuffixed name)

    @property
    def declared(self) -> Field:
        return self.source or self.spec

    @property
    def is_param(self) -> bool:
        return self.control is not None


def form_fields(
    facts: Mapping[str, Any] | None = None, *, units: int = CONTROL_UNITS
) -> tuple[FormField, ...]:
    """Every field of the page and the API, in page order, narrowed to the loaded model."""
    from .controls import CONTROLS

    facts = facts or {}
    laid_out = [FormField(spec.name, spec.narrowed(facts)) for spec in REQUEST_FIELDS]
    for position in range(1, units + 1):
        s = suffix(position)
        for spec in unit_fields():
            laid_out.append(_renamed(spec.narrowed(facts), spec.name + s, position))
        for control, control_spec in CONTROLS.items():
            for param in control_spec.params:
                key = f"{control}_{param.name}{s}"
                laid_out.append(_renamed(param, key, position, control))
    return tuple(laid_out)


def _renamed(spec: Field, key: str, unit: int, control: str | None = None) -> FormField:
    return FormField(key, replace(spec, name=key), unit=unit, control=control, source=spec)


# --------------------------------------------------------------------------------------
# Page values -> request values


@dataclass(frozen=True)
class ParsedUnit:
    """One active control unit's values, validated, still holding the raw image upload."""

    position: int
    control_type: str
    values: Mapping[str, Any]  # request attribute -> value (image: the upload as sent)
    params: Mapping[str, Any]


@dataclass(frozen=True)
class ParsedForm:
    request: Mapping[str, Any]  # GenerationRequest attribute -> request value
    texts: Mapping[str, Any]  # fields the service converts itself (the LoRA text)
    units: tuple[ParsedUnit, ...]


def parse_form(fields: tuple[FormField, ...], given: Mapping[str, Any]) -> ParsedForm:
    """Validate page/API values (missing or None: the field's default) by their names.

    Unknown names are refused, so a typo in an API call is an error, not a silent default.
    """
    known = {f.key for f in fields}
    unknown = sorted(k for k in given if k not in known)
    if unknown:
        raise InvalidRequestError(unknown[0], given[unknown[0]], "is not a field of this API")

    def value_of(item: FormField) -> Any:
        value = given.get(item.key)
        return item.spec.default if value is None else value

    request: dict[str, Any] = {}
    texts: dict[str, Any] = {}
    for item in (f for f in fields if f.unit is None):
        if item.spec.stored:
            request[item.spec.attribute] = item.spec.parse(value_of(item))
        else:
            texts[item.key] = item.spec.validate(value_of(item))
    units = []
    for position in sorted({f.unit for f in fields if f.unit is not None}):
        parsed = _parse_unit(position, [f for f in fields if f.unit == position], value_of)
        if parsed is not None:
            units.append(parsed)
    return ParsedForm(request=request, texts=texts, units=tuple(units))


def _parse_unit(position: int, fields: list[FormField], value_of) -> ParsedUnit | None:
    own = [f for f in fields if not f.is_param]
    type_field = next(f for f in own if f.declared.name == "control_type")
    control_type = type_field.spec.parse(value_of(type_field))
    if control_type is None:
        return None  # "none": the unit is off and its other fields are not looked at
    values = {
        f.declared.attribute: value_of(f) if f.spec.kind == "image" else f.spec.parse(value_of(f))
        for f in own
    }
    params = {
        f.declared.name: f.spec.validate(value_of(f)) for f in fields if f.control == control_type
    }
    return ParsedUnit(position, control_type, values, params)


# --------------------------------------------------------------------------------------
# Recipe -> page values


def values_from_recipe(fields: tuple[FormField, ...], recipe) -> dict[str, Any]:
    """The page values that reproduce `recipe`: every recorded field, units included.

    The LoRA text comes from the applied set; control images are not recorded (the user
    uploads them again), and fields of a control type the unit does not use are left out.
    Every value is checked against its field first: a recipe with one bad value restores
    nothing (RecipeError names the field), so the page is never half restored.
    """
    from .recipe import RecipeError

    try:
        _check_lora_text(recipe)
        values = _recorded_values(fields, recipe)
        by_key = {item.key: item for item in fields}
        for key, value in values.items():
            if key != "loras":
                by_key[key].spec.parse(value)
    except StencilError as exc:
        raise RecipeError(f"the recipe cannot be restored: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RecipeError(
            f"the recipe cannot be restored: an entry is malformed ({type(exc).__name__}: {exc})"
        ) from None
    return values


def _check_lora_text(recipe) -> None:
    for lora in recipe.loras:
        name = lora["name"]
        if not isinstance(name, str) or not name or any(c in name for c in ",:<>"):
            raise InvalidRequestError("loras", name, "a LoRA name without ',', ':', '<', '>'")
        LORA_WEIGHT.validate(lora["weight"])


def _recorded_values(fields: tuple[FormField, ...], recipe) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for item in fields:
        spec = item.declared
        if item.unit is None:
            if spec.recipe is not None:
                values[item.key] = item.spec.to_page(recipe.settings.get(spec.recipe))
            elif spec.name == "loras":
                values[item.key] = recipe.lora_text()
            continue
        unit = recipe.controls[item.unit - 1] if item.unit <= len(recipe.controls) else None
        if unit is None:
            if spec.name == "control_type":
                values[item.key] = NO_CONTROL
        elif item.is_param:
            if item.control == unit["control_type"] and spec.name in unit.get("params", {}):
                values[item.key] = unit["params"][spec.name]
        elif spec.recipe is not None:
            values[item.key] = item.spec.to_page(unit.get(spec.recipe))
    return values


# --------------------------------------------------------------------------------------
# The README's parameter table

TABLE_START = "<!-- parameter table: written by scripts/write_parameter_table.py -->"
TABLE_END = "<!-- end of parameter table -->"


def parameter_table(fields: tuple[FormField, ...] | None = None) -> str:
    """Markdown: every field of /generate (the first unit; the second's end in `_2`)."""
    fields = fields or form_fields()
    rows = [
        "| parameter | on the page | what it does | allowed | default | in the recipe |",
        "|---|---|---|---|---|---|",
    ]
    for item in fields:
        if item.unit not in (None, 1):
            continue
        spec = item.spec
        label = _cell(spec.label + (f" ({item.control})" if item.control else ""))
        cells = [f"`{item.key}`", label, _cell(spec.help), _cell(spec.describe())]
        cells += [f"`{spec.default!r}`", _recorded_as(item)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _cell(text: str) -> str:
    return text.replace("<", "&lt;").replace("|", "\\|")


def _recorded_as(item: FormField) -> str:
    spec = item.declared
    if item.is_param:
        return f"`controls[i].params.{spec.name}`"
    if spec.recipe is None:
        return "the applied LoRAs, with file hashes" if spec.name == "loras" else "no"
    return f"`controls[i].{spec.recipe}`" if item.unit else f"`{spec.recipe}`"
