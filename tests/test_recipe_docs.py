"""The README's key reference is generated from the schema and kept current; every key has a description."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qalign import recipe_docs
from qalign.recipe import Recipe
from qalign.recipe_load import _schema_paths

README = Path(__file__).parent.parent / "README.md"


def test_readme_key_reference_is_current():
    text = README.read_text(encoding="utf-8")
    assert recipe_docs.update_readme(text) == text, (
        "README.md's key reference is stale: run `python -m qalign.recipe_docs --write-readme` (make docs)"
    )


def test_check_flag_reports_a_stale_readme(tmp_path: Path):
    stale = tmp_path / "README.md"
    stale.write_text(f"intro\n{recipe_docs.BEGIN}\nold table\n{recipe_docs.END}\nmore\n", encoding="utf-8")
    assert recipe_docs.main(["--check", "--readme", str(stale)]) == 1
    assert recipe_docs.main(["--write-readme", "--readme", str(stale)]) == 0
    assert recipe_docs.main(["--check", "--readme", str(stale)]) == 0
    text = stale.read_text(encoding="utf-8")
    assert text.startswith("intro\n") and text.endswith(f"{recipe_docs.END}\nmore\n")
    assert "old table" not in text


def test_readme_without_markers_is_an_error():
    with pytest.raises(ValueError, match="keys:begin"):
        recipe_docs.update_readme("no markers here")


def _reference_rows() -> dict[str, list[str]]:
    """Dotted key -> its cells, read back from the rendered Markdown."""
    rows = {}
    for line in recipe_docs.render_reference().splitlines():
        match = re.match(r"\| `([a-z_.]+)` \|", line)
        if match:
            rows[match.group(1)] = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
    return rows


def test_reference_has_a_row_for_every_schema_key():
    # recipe.py's own walker (used for did-you-mean), not recipe_docs', so a section the renderer skipped shows.
    rows = _reference_rows()
    assert sorted(rows) == sorted(_schema_paths(Recipe))
    assert sorted(recipe_docs.key_paths()) == sorted(_schema_paths(Recipe))


def test_every_key_has_a_description():
    for prefix, model in recipe_docs.sections():
        for name, field in model.model_fields.items():
            assert field.description and len(field.description) > 10, f"{prefix}{name} has no description"


def test_reference_shows_defaults_types_and_bounds():
    rows = _reference_rows()
    assert rows["sft.lr"][1:3] == ["`float > 0`", "`0.0002`"]
    assert rows["dpo.lr"][2] == "`5.0e-06`"  # DPO's own default, not the inherited one
    assert rows["model.base"][2] == "required"
    assert rows["model.quantization"][1] == "`nf4 \\| fp4 \\| none`"
    assert rows["sft.max_steps"][1] == "`int > 0 \\| null`"
    assert rows["lora.dropout"][1] == "`float >= 0, < 1`"
    assert rows["sft.gradient_checkpointing"][1:3] == ["`bool \\| auto`", "`auto`"]


def test_defaults_shown_are_the_schema_defaults():
    import yaml

    rows = _reference_rows()
    for prefix, model in recipe_docs.sections():
        for name, field in model.model_fields.items():
            if field.is_required() or field.default_factory is not None:
                continue
            shown = rows[prefix + name][2].strip("`")
            assert yaml.safe_load(shown) == field.default, prefix + name


def test_angle_brackets_outside_code_are_escaped():
    # GitHub would hide a bare <output_dir> as an unknown HTML tag.
    assert recipe_docs._cell("default <output_dir>/merged") == "default &lt;output_dir&gt;/merged"
    assert recipe_docs._cell("default `<output_dir>/merged`") == "default `<output_dir>/merged`"
    assert recipe_docs._cell("`a | b`") == "`a \\| b`"


def test_a_key_without_description_is_refused_by_name():
    from pydantic.fields import FieldInfo

    with pytest.raises(ValueError, match=r"'sft\.lr' has no description"):
        recipe_docs.description(FieldInfo(annotation=float, default=1.0), "sft.lr")
