"""Every recipe under recipes/ parses against the schema, with its local paths present (no downloads)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qalign.data import detect_format, read_rows, to_messages
from qalign.dpo import split_preference
from qalign.kto import is_unpaired, parse_unpaired
from qalign.recipe_load import load_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_is_valid(path: Path):
    recipe = load_recipe(path)
    assert recipe.name and recipe.out.is_absolute()
    for name in ("sft", "dpo"):
        stage = getattr(recipe, name)
        if stage is None:
            continue
        for source in (stage.data.train, stage.data.eval):
            if source is not None and Path(source).is_absolute():
                # Local data ships with the repo and must be valid, row by row.
                rows = read_rows(source)
                # KTO's unpaired rows where the recipe reads them so (the loss and the data must agree).
                unpaired = name == "dpo" and is_unpaired(rows, stage, path)
                for row in rows:
                    if name == "sft":
                        to_messages(row, detect_format(rows, stage.data.format))
                    elif unpaired:
                        parse_unpaired(row)
                    else:
                        split_preference(row)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_key_has_a_comment(path: Path):
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        above = lines[i - 1].strip() if i else ""
        assert above.startswith("#") or stripped.endswith(":"), (
            f"{path.name}:{i + 1} has no comment: {stripped}"
        )


def _dotted_keys(mapping: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in mapping.items():
        keys.append(prefix + str(key))
        if isinstance(value, dict):
            keys.extend(_dotted_keys(value, f"{prefix}{key}."))
    return keys


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_uses_only_schema_keys(path: Path):
    # Spelled out (load_recipe would also refuse): a shipped recipe is documentation, and the key reference
    # (qalign.recipe_docs) is what its keys are checked against.
    import yaml

    from qalign.recipe_docs import key_paths

    known = set(key_paths())
    unknown = [key for key in _dotted_keys(yaml.safe_load(path.read_text())) if key not in known]
    assert not unknown, f"{path.name}: keys the schema does not know: {unknown}"


def _commented_choices(path: Path) -> list[tuple[str, set[str], int]]:
    """(dotted key, choices its comment lists as `a | b | c:`, line) for every such comment in a recipe."""
    found, stack = [], []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"( *)([a-z_]+):", line)
        if not match:
            continue
        depth = len(match.group(1)) // 2
        stack[depth:] = [match.group(2)]
        above = lines[i - 1].strip() if i else ""
        listed = re.match(r"# ([\w.-]+(?: \| [\w.-]+)+)[:.]", above)
        if listed:
            found.append((".".join(stack), set(listed.group(1).split(" | ")), i + 1))
    return found


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_choices_in_comments_are_the_schema_choices(path: Path):
    # Hand-written comments drift; the choices they list are checked against the schema's.
    from qalign.recipe_docs import sections, type_text

    types = {
        prefix + name: type_text(field)
        for prefix, model in sections()
        for name, field in model.model_fields.items()
    }
    for key, listed, line in _commented_choices(path):
        schema = set(types[key].split(" | ")) - {"null"}
        assert listed == schema, (
            f"{path.name}:{line}: comment lists {sorted(listed)}; {key} takes {sorted(schema)}"
        )
