"""`qalign init`: a commented starter recipe from the schema that validates once its data is in place."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from conftest import arithmetic_rows, preference_rows, write_jsonl
from typer.testing import CliRunner

from qalign import starter
from qalign.cli import app
from qalign.errors import UserError
from qalign.recipe import Recipe
from qalign.recipe_docs import key_paths
from qalign.recipe_load import load_recipe

runner = CliRunner()


def init(*args: str):
    return runner.invoke(app, ["init", *args])


def dotted_keys(mapping: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in mapping.items():
        keys.add(prefix + key)
        if isinstance(value, dict):
            keys |= dotted_keys(value, f"{prefix}{key}.")
    return keys


def test_starter_validates_once_its_data_exists(tmp_path: Path, tiny_model):
    model = tiny_model("llama")
    recipe = tmp_path / "recipe.yaml"
    result = init("--model", str(model), "--out", str(recipe))
    assert result.exit_code == 0, result.output
    assert "data/sft.jsonl" in result.output and "qalign validate" in result.output
    assert yaml.safe_load(recipe.read_text())["model"]["base"] == str(model)

    # Until the placeholders are filled, validation names the first one, with its line.
    with pytest.raises(
        UserError, match=r"recipe\.yaml:\d+: sft\.data\.train: file .*data/sft\.jsonl not found"
    ):
        load_recipe(recipe)
    write_jsonl(tmp_path / "data" / "sft.jsonl", arithmetic_rows(8))
    with pytest.raises(UserError, match=r"dpo\.data\.train: file .*data/dpo\.jsonl not found"):
        load_recipe(recipe)
    write_jsonl(tmp_path / "data" / "dpo.jsonl", preference_rows(8))

    loaded = load_recipe(recipe)
    assert loaded.sft.data.train == str(tmp_path / "data" / "sft.jsonl")
    assert loaded.out == tmp_path / "runs" / starter.run_name(str(model))
    assert loaded.merge is None  # written commented out: `qalign run` does not merge unless asked
    # Everything else is at the schema's defaults.
    defaults = Recipe.model_validate(
        {
            "name": loaded.name,
            "model": {"base": loaded.model.base},
            "sft": {"data": {"train": loaded.sft.data.train}},
            "dpo": {"data": {"train": loaded.dpo.data.train}},
        }
    )
    defaults.output_dir = loaded.output_dir
    assert loaded.model_dump() == defaults.model_dump()

    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "data ok" in result.output


def test_starter_lists_every_key_with_a_comment():
    text = starter.starter_recipe("org/model")
    # The merge and export sections are commented out; uncommented, the file holds every key of the schema.
    uncommented = (
        text.replace("\n# merge:", "\nmerge:").replace("\n# export:", "\nexport:").replace("\n#   ", "\n  ")
    )
    assert dotted_keys(yaml.safe_load(uncommented)) == set(key_paths())
    lines = text.splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            assert lines[i - 1].strip().startswith("#"), f"line {i + 1} has no comment: {stripped}"
    assert "# Peak learning rate of AdamW" in text and "(type: float > 0, default: 0.0002)" in text
    assert max(len(line) for line in lines) <= 110


def test_init_refuses_to_overwrite(tmp_path: Path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: mine\n")
    result = init("--out", str(recipe))
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: {recipe} already exists; pass --overwrite to replace it"
    ]
    assert recipe.read_text() == "name: mine\n"

    result = init("--out", str(recipe), "--overwrite")
    assert result.exit_code == 0, result.output
    assert recipe.read_text() == starter.starter_recipe(starter.DEFAULT_MODEL)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_init_into_a_folder_is_an_error(tmp_path: Path):
    result = init("--out", str(tmp_path), "--overwrite")
    assert result.exit_code == 2 and "is a folder" in result.output


def test_unwritable_destination_is_one_line(tmp_path: Path):
    (tmp_path / "file").write_text("")
    result = init("--out", str(tmp_path / "file" / "recipe.yaml"))
    assert result.exit_code == 2 and "cannot write the recipe" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_cli_default_model_is_the_starter_default(tmp_path: Path):
    recipe = tmp_path / "recipe.yaml"
    assert init("--out", str(recipe)).exit_code == 0
    assert yaml.safe_load(recipe.read_text())["model"]["base"] == starter.DEFAULT_MODEL
    assert load_recipe(recipe, ["sft=null", "dpo=null"]).model.base == starter.DEFAULT_MODEL


def test_relative_model_folder_is_rebased_onto_the_recipe(tmp_path: Path, monkeypatch):
    (tmp_path / "models" / "mine").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    recipe = Path("recipes") / "r.yaml"
    assert init("--model", "models/mine", "--out", str(recipe)).exit_code == 0
    assert yaml.safe_load(recipe.read_text())["model"]["base"] == os.path.join("..", "models", "mine")
    loaded = load_recipe(recipe, ["sft=null", "dpo=null"])
    assert loaded.model.base == str(tmp_path / "models" / "mine")


def test_run_name_from_the_model():
    assert starter.run_name("Qwen/Qwen2.5-0.5B-Instruct") == "qwen2.5-0.5b-instruct"
    assert starter.run_name("./models/My Model/") == "my-model"
    assert starter.run_name("/") == "my-run"
