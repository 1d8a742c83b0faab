"""`qalign init`: a starter recipe generated from the schema, with a comment above every key giving its
description, type and default (as litgpt's config_hub files do), so that it cannot drift from recipe.py."""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from qalign.recipe import Recipe
from qalign.recipe_docs import description, section_type, type_text, yaml_value

# Small enough for an 8 GB GPU or a CPU, has a chat template, and `qalign plan` knows its shapes offline.
DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
# Placeholders the user must replace (or fill with data): `qalign validate` names the first one missing.
SFT_DATA = "data/sft.jsonl"
DPO_DATA = "data/dpo.jsonl"
# Sections written out but commented: merge and export sections change what `qalign run` does, so they are
# opt-in.
COMMENTED = {"merge", "export"}
WIDTH = 110


def starter_recipe(model: str = DEFAULT_MODEL, name: str | None = None) -> str:
    """The recipe text: every schema key at its default, except the model, the name and the data paths."""
    name = name or run_name(model)
    values = {
        "name": name,
        "model": {"base": model},
        "sft": {"data": {"train": SFT_DATA}},
        "dpo": {"data": {"train": DPO_DATA}},
    }
    header = [
        f"# qalign starter recipe for {model}, written by `qalign init`.",
        "# Every key is listed at its default, with its type and meaning; keys left out take the same default.",
        f"# Before training: put chat data at {SFT_DATA} and preference pairs at {DPO_DATA} (beside this file),",
        "# or point sft.data.train and dpo.data.train elsewhere; `qalign validate` on this file names what is",
        "# still missing. Then `qalign run` on it trains sft, then dpo.",
        "",
    ]
    return "\n".join(header + _section(Recipe, values, indent=0)) + "\n"


def run_name(model: str) -> str:
    """`Qwen/Qwen2.5-0.5B-Instruct` -> `qwen2.5-0.5b-instruct`: a folder name for runs/<name>."""
    leaf = Path(model.rstrip("/\\")).name.lower()
    return re.sub(r"[^a-z0-9._-]+", "-", leaf).strip("-.") or "my-run"


def model_for_recipe(model: str, recipe: Path) -> str:
    """A relative local folder is relative to the working folder here, but to the recipe's folder once
    written into it: rebase it so both name the same folder. Hub ids and absolute paths stay as they are."""
    local = Path(model).expanduser()
    if local.is_absolute() or not local.exists():
        return model
    try:
        return os.path.relpath(local.resolve(), recipe.resolve().parent)
    except ValueError:  # another drive on Windows
        return str(local.resolve())


def _section(
    model: type[BaseModel], values: dict[str, Any], indent: int, prefix: str = "", width: int = WIDTH
) -> list[str]:
    pad = " " * indent
    lines: list[str] = []
    for key, field in model.model_fields.items():
        sub, text = section_type(field), description(field, prefix + key)
        if sub is not None:
            if key not in values and key not in COMMENTED and field.default_factory is None:
                continue  # an optional section the starter does not use
            # A commented-out section's lines get "# " in front, so they are wrapped that much narrower.
            inner = width - 2 if key in COMMENTED else width
            body = [f"{pad}{key}:", *_section(sub, values.get(key, {}), indent + 2, f"{prefix}{key}.", inner)]
            if indent == 0:
                lines.append("")  # top-level sections stand apart
            if key in COMMENTED:
                note = f"{text} Uncomment to use it:"
                lines += [*_comment(note, pad, width), *(f"{pad}# {line[indent:]}" for line in body)]
            else:
                lines += [*_comment(text, pad, width), *body]
            continue
        default = "required" if field.is_required() else f"default: {yaml_value(field.default)}"
        value = values.get(key, None if field.is_required() else field.default)
        lines += _comment(f"{text} (type: {type_text(field)}, {default})", pad, width)
        lines.append(f"{pad}{key}: {yaml_value(value)}")
    return lines


def _comment(text: str, pad: str, width: int = WIDTH) -> list[str]:
    return [f"{pad}# {line}" for line in textwrap.wrap(text, width - len(pad) - 2)]
