"""The spec reference: every stack key with its type, default, allowed values and description.

Generated from the pydantic models of `loopform.spec`, as terraform-docs documents a Terraform module, so
the reference a reviewer reads beside a stack diff cannot drift from the code that validates the stack.
`python -m loopform.spec_reference` prints it; `--out docs/spec-reference.md` writes the committed copy.
"""

from __future__ import annotations

import argparse
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from loopform.spec import CONFIG_KEY, FORMATS, Namespaces, PlatformSpec, field_shape, variant_tag

#: The key of a map-keyed section (models.<name>, gpu.pools.<name>): a name the stack chooses.
PLACEHOLDER = "<name>"


@dataclass(frozen=True)
class Key:
    """One leaf key of the spec."""

    path: str
    type: str
    default: str
    allowed: str
    description: str


@dataclass(frozen=True)
class Section:
    """One section (a pydantic model) at its dotted path; `kind` names the variant of a union section."""

    path: str
    kind: str | None
    about: str
    keys: tuple[Key, ...]


#: Defaults a stack gets that the section's own defaults do not show: namespaces are scoped by environment.
_STACK_DEFAULTS: dict[str, BaseModel] = {
    "cluster.namespaces": Namespaces.model_construct(**Namespaces.for_environment("<environment>")),
}


def sections() -> list[Section]:
    """Every section of the spec, depth first in declaration order."""
    found: list[Section] = []
    _walk(_Place(PlatformSpec, "", None, False, _doc(PlatformSpec), None), found)
    return found


def leaf_keys() -> list[Key]:
    """Every leaf key, in reference order (a key of a union section once per variant)."""
    return [key for section in sections() for key in section.keys]


@dataclass(frozen=True)
class _Place:
    """Where a section model sits: its path, the variant it belongs to, whether a `kind` selects it among
    others, what to say of it, and the value it has when left out (registry.resources is 500m, not the
    250m of Resources' own defaults)."""

    model: type[BaseModel]
    path: str
    kind: str | None
    selected: bool
    about: str
    defaults: BaseModel | None


def _walk(place: _Place, found: list[Section]) -> None:
    properties = place.model.model_json_schema()["properties"]
    keys: list[Key] = []
    below: list[_Place] = []
    for name, field in place.model.model_fields.items():
        path = f"{place.path}.{name}" if place.path else name
        shape, models = field_shape(field.annotation)
        if shape == "leaf":
            default = getattr(place.defaults, name) if place.defaults is not None else _field_default(field)
            if place.selected and name == "kind":
                default = _REQUIRED  # pydantic tells a union's variants by this key: given even when the default
            keys.append(_key(path, field, properties[name], default))
            continue
        path += {"section": "", "map": f".{PLACEHOLDER}", "list": "[]"}[shape]
        value = None
        if shape == "section" and place.defaults is not None:
            value = getattr(place.defaults, name)
        elif shape == "section" and not field.is_required():
            value = field.get_default(call_default_factory=True)
        value = _STACK_DEFAULTS.get(path, value)
        for model in models:
            selected = len(models) > 1
            kind = variant_tag(model) if selected else place.kind
            about = _section_about(field, model, shape)
            if selected and isinstance(value, model):
                about += f" Left out, `{path}` is this kind with its defaults."
            below.append(_Place(model, path, kind, selected, about, value if isinstance(value, model) else None))
    found.append(Section(place.path, place.kind, place.about, tuple(keys)))
    for each in below:
        _walk(each, found)


_REQUIRED = object()


def _field_default(field: FieldInfo) -> Any:
    return _REQUIRED if field.is_required() else field.get_default(call_default_factory=True)


def _doc(model: type[BaseModel]) -> str:
    return " ".join((inspect.getdoc(model) or "").split())


def _section_about(field: FieldInfo, model: type[BaseModel], shape: str) -> str:
    parts = [_doc(model)]
    if field.description:
        parts.append(field.description)
    if shape == "map":
        parts.append(f"One section per `{PLACEHOLDER}` the stack chooses (a DNS-1123 label).")
    elif shape == "list":
        parts.append("A list of such entries.")
    if not field.is_required() and field.default is None:
        parts.append("Optional: absent by default.")
    return " ".join(parts)


def _key(path: str, field: FieldInfo, schema: dict[str, Any], default: Any) -> Key:
    return Key(
        path=path,
        type=_type(schema),
        default="required" if default is _REQUIRED else _value(default),
        allowed=_allowed(schema),
        description=field.description or "",
    )


def _non_null(schema: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    members = schema.get("anyOf")
    if members and {"type": "null"} in members:
        rest = [m for m in members if m != {"type": "null"}]
        if len(rest) == 1:
            return {**rest[0], **{k: v for k, v in schema.items() if k != "anyOf"}}, True
    return schema, False


_TYPES = {"string": "string", "integer": "integer", "number": "number", "boolean": "boolean", "null": "null"}


def _type(schema: dict[str, Any]) -> str:
    schema, nullable = _non_null(schema)
    if "format" in schema:
        name = schema["format"]
    elif "enum" in schema or "const" in schema:
        name = "string"
    elif "anyOf" in schema:
        name = " or ".join(_type(m) for m in schema["anyOf"])
    elif schema.get("type") == "array":
        name = f"list of {_type(schema.get('items', {}))}"
    elif schema.get("type") == "object":
        values = schema.get("additionalProperties")
        name = f"map of string to {_type(values)}" if isinstance(values, dict) and values else "map"
    else:
        name = _TYPES.get(schema.get("type", ""), "any")
    return f"{name} or null" if nullable else name


def _allowed(schema: dict[str, Any]) -> str:
    schema, _ = _non_null(schema)
    parts = []
    if "enum" in schema:
        parts.append(", ".join(f"`{v}`" for v in schema["enum"]))
    if "const" in schema:
        parts.append(f"`{schema['const']}`")
    if "pattern" in schema:
        parts.append(f"matches `{schema['pattern']}`")
    parts.extend(_range(schema))
    if schema.get("minLength") == 1:
        parts.append("not empty")
    if "minItems" in schema or "minProperties" in schema:
        parts.append(f"at least {schema.get('minItems', schema.get('minProperties'))}")
    if schema.get("type") == "array" and (each := _allowed(schema.get("items", {}))):
        parts.append(f"each: {each}")
    return "; ".join(parts)


def _range(schema: dict[str, Any]) -> list[str]:
    low, high = schema.get("minimum"), schema.get("maximum")
    if low is not None and high is not None:
        return [f"{low} to {high}"]
    bounds = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}
    return [f"{sign} {schema[name]}" for name, sign in bounds.items() if name in schema]


def _value(value: Any) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return f"`{json.dumps(value)}`" if not isinstance(value, str) else f"`{value}`" if value else '`""`'


def _prose(text: str) -> str:
    """Text for Markdown: `<name>` outside code spans would be read as an HTML tag and vanish."""
    parts = text.split("`")
    return "`".join(part.replace("<", "&lt;") if i % 2 == 0 else part for i, part in enumerate(parts))


def _cell(text: str) -> str:
    return _prose(text).replace("|", "\\|").replace("\n", " ") or " "


def markdown() -> str:
    """The reference as Markdown, one table per section."""
    lines = [
        "# Stack spec reference",
        "",
        "<!-- Generated by `python -m loopform.spec_reference --out docs/spec-reference.md` from loopform/spec.py;"
        " do not edit. -->",
        "",
        f"Every key of `{CONFIG_KEY}` in a stack file (`stacks/Pulumi.<env>.yaml`), by its dotted path under"
        " that key. Unknown keys are errors, each naming the closest known key.",
        "",
        "- Types are strict: a boolean is not an integer, and a quoted number is a string, not a number."
        " An integer serves where a number is declared.",
        f"- `{PLACEHOLDER}` stands for a name the stack chooses (a DNS-1123 label), e.g. `models.fraud`.",
        "- A section with variants (`kind`) lists the keys of each variant; `kind` selects one.",
        "- `[]` marks a list of entries, each with the keys listed.",
        "",
        "Types named by format are strings of that form:",
        "",
        *(f"- `{name}`: {_prose(text)}." for name, text in FORMATS.items()),
    ]
    for section in sections():
        title = f"`{section.path}`" if section.path else "Top level"
        lines += ["", f"## {title}" + (f" (kind: `{section.kind}`)" if section.kind else ""), ""]
        lines += [_prose(section.about), ""] if section.about else []
        if not section.keys:
            lines.append("Only sections, listed below.")
            continue
        lines += ["| Key | Type | Default | Allowed | Description |", "| --- | --- | --- | --- | --- |"]
        for key in section.keys:
            cells = (f"`{key.path}`", key.type, key.default, key.allowed, key.description)
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loopform.spec_reference", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the reference to this file instead of printing it")
    args = parser.parse_args(argv)
    text = markdown()
    if args.out is None:
        print(text, end="")
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
