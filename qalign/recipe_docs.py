"""The README's recipe key reference, generated from the schema in recipe.py.

`python -m qalign.recipe_docs --write-readme` rewrites the text between the README's markers;
`--check` exits 1 when it is stale (tests/test_recipe_docs.py fails the same way).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from annotated_types import Ge, Gt, Lt
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from qalign.recipe import Recipe

BEGIN = "<!-- keys:begin -->"
END = "<!-- keys:end -->"
README = Path(__file__).resolve().parent.parent / "README.md"


def sections(model: type[BaseModel] = Recipe, prefix: str = "") -> Iterator[tuple[str, type[BaseModel]]]:
    """(dotted prefix, section class) for every section, parents before children, in schema order."""
    yield prefix, model
    for name, field in model.model_fields.items():
        sub = section_type(field)
        if sub is not None:
            yield from sections(sub, f"{prefix}{name}.")


def section_type(field: FieldInfo) -> type[BaseModel] | None:
    """The section a field holds (`sft: SftSpec | None` holds SftSpec), or None for a plain value."""
    for candidate in (field.annotation, *get_args(field.annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def key_paths() -> list[str]:
    """Every dotted key the schema accepts, sections included (sft, sft.data, sft.data.train, ...)."""
    return [prefix + name for prefix, model in sections() for name in model.model_fields]


def type_text(field: FieldInfo) -> str:
    """The type as a recipe author writes it: `nf4 | fp4 | none`, `int > 0`, `str | null`."""
    if section_type(field) is not None:
        return "section"
    text = _annotation_text(field.annotation)
    bounds = [
        f"{op} {_number(getattr(m, attr))}"
        for m in field.metadata
        for cls, op, attr in ((Gt, ">", "gt"), (Ge, ">=", "ge"), (Lt, "<", "lt"))
        if isinstance(m, cls)
    ]
    if not bounds:
        return text
    # The bounds apply to the number, not to null: `int > 0 | null`.
    number, null, _ = text.partition(" | null")
    return f"{number} {', '.join(bounds)}{null}"


def _annotation_text(annotation: Any) -> str:
    if annotation is type(None):
        return "null"
    if get_origin(annotation) is Literal:
        return " | ".join(str(value) for value in get_args(annotation))
    if get_origin(annotation) is list:
        return f"list[{_annotation_text(get_args(annotation)[0])}]"
    if get_origin(annotation) is dict:
        key, value = get_args(annotation)
        return f"map {_annotation_text(key)} -> {_annotation_text(value)}"
    args = get_args(annotation)
    if args:  # a union
        return " | ".join(_annotation_text(arg) for arg in args)
    return getattr(annotation, "__name__", str(annotation))


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def yaml_value(value: Any) -> str:
    """A value as it is written in a recipe (`true`, `null`, `2.0e-04`, `all-linear`)."""
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n").removesuffix("\n...")


def default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        return "its keys' defaults"
    return f"`{yaml_value(field.default)}`"


def description(field: FieldInfo, key: str) -> str:
    # Generated docs with a hole in them would look complete; refuse instead.
    if not field.description:
        raise ValueError(f"recipe key '{key}' has no description: add Field(description=...) in recipe.py")
    return field.description


def render_reference() -> str:
    """Markdown: one table per section with key, type, default and description."""
    parts = []
    for prefix, model in sections():
        title = f"`{prefix.rstrip('.')}`" if prefix else "top level"
        parts.append(f"### {title}\n")
        doc = model.__dict__.get("__doc__")
        if doc:
            parts.append(f"{_cell(doc.strip())}\n")
        parts.append("| key | type | default | description |\n| --- | --- | --- | --- |")
        for name, field in model.model_fields.items():
            row = (
                f"`{prefix}{name}`",
                f"`{type_text(field)}`",
                default_text(field),
                description(field, prefix + name),
            )
            parts.append("| " + " | ".join(_cell(cell) for cell in row) + " |")
        parts.append("")
    return "\n".join(parts)


def _cell(text: str) -> str:
    # GitHub takes a bare <name> for an HTML tag and hides it; inside backticks it is shown as written. A pipe
    # ends a table cell everywhere, code spans included, unless escaped.
    pieces = re.split(r"(`[^`]*`)", text.replace("\n", " "))
    escaped = [p if p.startswith("`") else p.replace("<", "&lt;").replace(">", "&gt;") for p in pieces]
    return "".join(escaped).replace("|", "\\|")


def readme_block() -> str:
    note = "<!-- Generated from qalign/recipe.py by `python -m qalign.recipe_docs --write-readme`; edit there. -->"
    # A blank line before the end marker keeps the last table from absorbing it.
    return f"{BEGIN}\n{note}\n\n{render_reference()}\n{END}"


def update_readme(text: str) -> str:
    """`text` with its key reference replaced by the current one."""
    begin, end = text.find(BEGIN), text.find(END)
    if begin < 0 or end < begin:
        raise ValueError(f"the README has no {BEGIN} ... {END} block")
    return text[:begin] + readme_block() + text[end + len(END) :]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qalign.recipe_docs", description=__doc__)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write-readme", action="store_true", help="rewrite the README's key reference")
    group.add_argument("--check", action="store_true", help="exit 1 when the README's key reference is stale")
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    if not (args.write_readme or args.check):
        sys.stdout.write(render_reference())
        return 0
    current = args.readme.read_text(encoding="utf-8")
    wanted = update_readme(current)
    if args.check:
        if wanted != current:
            print(
                f"{args.readme}: the key reference is stale; run python -m qalign.recipe_docs --write-readme"
            )
            return 1
        return 0
    if wanted != current:
        from qalign.atomic import atomic_write_text

        atomic_write_text(args.readme, wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
