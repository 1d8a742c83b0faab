"""The recipe: values and defaults, paths resolved against the recipe's folder, unknown keys with a
did-you-mean and the right line, `--set` overrides, hostile YAML, invalid values, and the resolved dump."""

from __future__ import annotations

from pathlib import Path

import pytest

from qalign.errors import UserError
from qalign.recipe import Recipe
from qalign.recipe_load import load_recipe, parse_recipe

# The documented contract, verbatim (flow mappings for model and lora).
CONTRACT = """\
name: my-run
output_dir: runs/my-run
seed: 0
model: {base: Qwen/Qwen2.5-0.5B-Instruct, quantization: nf4, double_quant: true, compute_dtype: auto, trust_remote_code: false, chat_template: null}
lora: {r: 16, alpha: 32, dropout: 0.05, target_modules: all-linear}
sft:
  data: {train: data/sft.jsonl, eval: null, format: auto}
  max_length: 1024
  epochs: 1
  max_steps: null
  batch_size: 4
  grad_accum: 1
  lr: 2.0e-4
  scheduler: cosine
  warmup_ratio: 0.03
  gradient_checkpointing: true
  save_every: 200
  eval_every: 200
"""

# The same recipe in block style, so that every key sits on its own line.
BLOCK = """\
name: my-run
output_dir: runs/my-run
seed: 0
model:
  base: Qwen/Qwen2.5-0.5B-Instruct
  quantization: nf4
  double_quant: true
  compute_dtype: auto
  trust_remote_code: false
  chat_template: null
lora:
  r: 16
  alpha: 32
  dropout: 0.05
  target_modules: all-linear
sft:
  data:
    train: data/sft.jsonl
    eval: null
    format: auto
  max_length: 1024
  epochs: 1
  max_steps: null
  batch_size: 4
  grad_accum: 1
  lr: 2.0e-4
  scheduler: cosine
  warmup_ratio: 0.03
  gradient_checkpointing: true
  save_every: 200
  eval_every: 200
"""


def write(folder: Path, text: str, name: str = "recipe.yaml", data: tuple[str, ...] = ("data/sft.jsonl",)):
    """The recipe at folder/name, with empty files for the data paths it names (they must exist)."""
    for relative in data:
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text("{}\n", encoding="utf-8")
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def line_of(text: str, needle: str) -> int:
    """1-based number of the first line containing needle."""
    for number, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in the recipe")


def load_error(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(UserError) as info:
        load_recipe(path, overrides)
    return str(info.value)


# ----------------------------------------------------------------------------------------------------------
# A valid recipe


def test_the_contract_loads_with_its_values_and_defaults(tmp_path):
    path = write(tmp_path, CONTRACT)
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.source == path.resolve()
    assert recipe.name == "my-run"
    assert recipe.output_dir == str((tmp_path / "runs" / "my-run").resolve())
    assert recipe.out == (tmp_path / "runs" / "my-run").resolve()
    assert recipe.seed == 0
    model = recipe.model
    assert model.base == "Qwen/Qwen2.5-0.5B-Instruct"
    assert (model.quantization, model.double_quant, model.compute_dtype) == ("nf4", True, "auto")
    assert model.trust_remote_code is False and model.chat_template is None
    assert (model.revision, model.allow_pickle, model.attn_implementation) == (None, False, None)
    lora = recipe.lora
    assert (lora.r, lora.alpha, lora.dropout, lora.target_modules) == (16, 32.0, 0.05, "all-linear")
    sft = recipe.sft
    assert sft is not None
    assert sft.data.train == str((tmp_path / "data" / "sft.jsonl").resolve())
    assert (sft.data.eval, sft.data.format) == (None, "auto")
    assert (sft.data.train_split, sft.data.eval_split) == ("train", "test")
    assert (sft.max_length, sft.epochs, sft.max_steps, sft.batch_size, sft.grad_accum) == (
        1024,
        1,
        None,
        4,
        1,
    )
    assert sft.lr == pytest.approx(2.0e-4) and isinstance(sft.lr, float)
    assert (sft.scheduler, sft.warmup_ratio, sft.gradient_checkpointing) == ("cosine", 0.03, True)
    assert (sft.save_every, sft.eval_every) == (200, 200)
    # Defaults for keys the contract leaves out.
    assert (sft.overlong, sft.weight_decay, sft.max_grad_norm) == ("drop", 0.0, 1.0)
    assert (sft.save_total_limit, sft.log_every, sft.nan_policy) == (2, 1, "stop")
    assert recipe.dpo is None and recipe.merge is None


def test_block_style_loads_the_same_recipe(tmp_path):
    flow = load_recipe(write(tmp_path, CONTRACT))
    block = load_recipe(write(tmp_path, BLOCK))
    assert flow == block


def test_a_minimal_recipe_fills_every_default(tmp_path):
    recipe = load_recipe(write(tmp_path, "name: tiny\nmodel: {base: org/model}\n", data=()))
    assert recipe.output_dir == str((tmp_path / "runs" / "tiny").resolve())
    assert recipe.seed == 0
    assert recipe.model.quantization == "nf4" and recipe.model.compute_dtype == "auto"
    assert recipe.lora.model_dump() == {
        "r": 16,
        "alpha": 32.0,
        "dropout": 0.05,
        "target_modules": "all-linear",
    }
    assert recipe.sft is None and recipe.dpo is None and recipe.merge is None


# ----------------------------------------------------------------------------------------------------------
# Paths


def test_relative_paths_resolve_against_the_recipe_folder_not_the_cwd(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "models" / "tiny").mkdir(parents=True)
    (project / "templates").mkdir()
    (project / "templates" / "chat.jinja").write_text("{{ messages }}", encoding="utf-8")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "eval.jsonl").write_text("{}\n", encoding="utf-8")
    text = (
        BLOCK.replace("base: Qwen/Qwen2.5-0.5B-Instruct", "base: models/tiny")
        .replace("chat_template: null", "chat_template: templates/chat.jinja")
        .replace("eval: null", "eval: ../shared/eval.jsonl")
        .replace("output_dir: runs/my-run", "output_dir: out/here")
    )
    path = write(project, text)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # Named relative to the cwd, as `qalign run ../project/recipe.yaml` would.
    recipe = load_recipe(Path("..") / "project" / "recipe.yaml")
    root = project.resolve()
    assert recipe.source == path.resolve()
    assert recipe.output_dir == str(root / "out" / "here")
    assert recipe.model.base == str(root / "models" / "tiny")
    assert recipe.model.chat_template == str(root / "templates" / "chat.jinja")
    assert recipe.sft is not None
    assert recipe.sft.data.train == str(root / "data" / "sft.jsonl")
    assert recipe.sft.data.eval == str((tmp_path / "shared" / "eval.jsonl").resolve())
    assert not (elsewhere / "out").exists()


def test_absolute_paths_stay_as_given(tmp_path):
    data = tmp_path / "abs" / "train.jsonl"
    data.parent.mkdir()
    data.write_text("{}\n", encoding="utf-8")
    out = tmp_path / "abs" / "out"
    text = BLOCK.replace("train: data/sft.jsonl", f"train: {data}").replace(
        "output_dir: runs/my-run", f"output_dir: {out}"
    )
    sub = tmp_path / "recipes"
    sub.mkdir()
    recipe = load_recipe(write(sub, text, data=()))
    assert recipe.sft is not None
    assert recipe.sft.data.train == str(data)
    assert recipe.output_dir == str(out)


def test_hub_ids_stay_as_given(tmp_path):
    text = BLOCK.replace("train: data/sft.jsonl", "train: HuggingFaceH4/ultrachat_200k").replace(
        "eval: null", "eval: HuggingFaceH4/ultrachat_200k"
    )
    recipe = load_recipe(write(tmp_path, text, data=()))
    assert recipe.model.base == "Qwen/Qwen2.5-0.5B-Instruct"
    assert recipe.sft is not None
    assert recipe.sft.data.train == "HuggingFaceH4/ultrachat_200k"
    assert recipe.sft.data.eval == "HuggingFaceH4/ultrachat_200k"


@pytest.mark.parametrize(
    ("old", "missing", "key"),
    [
        ("train: data/sft.jsonl", "data/missing.jsonl", "sft.data.train"),
        ("train: data/sft.jsonl", "missing.jsonl", "sft.data.train"),
        ("train: data/sft.jsonl", "missing.parquet", "sft.data.train"),
        ("eval: null", "data/missing_eval.jsonl", "sft.data.eval"),
        ("base: Qwen/Qwen2.5-0.5B-Instruct", "./models/missing", "model.base"),
        ("chat_template: null", "templates/missing.jinja", "model.chat_template"),
    ],
)
def test_a_missing_local_path_names_the_file_and_key(tmp_path, old, missing, key):
    field = old.split(":")[0]
    text = BLOCK.replace(old, f"{field}: {missing}")
    path = write(tmp_path, text)
    message = load_error(path)
    assert message.startswith(f"{path}:{line_of(text, f'{field}: {missing}')}: {key}: ")
    assert str((tmp_path / missing).resolve()) in message
    assert "not found" in message


def test_a_missing_recipe_file_is_a_user_error(tmp_path):
    message = load_error(tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in message and "not found" in message


# ----------------------------------------------------------------------------------------------------------
# Unknown keys: did-you-mean, with the line of the offending key


@pytest.mark.parametrize(
    ("old", "new", "needle", "expected"),
    [
        pytest.param(
            "  lr: 2.0e-4", "  lrr: 2.0e-4", "lrr:", "unknown key 'sft.lrr'; did you mean 'sft.lr'?"
        ),
        pytest.param(
            "    format: auto",
            "    fromat: auto",
            "fromat:",
            "unknown key 'sft.data.fromat'; did you mean 'sft.data.format'?",
            id="nested-two-deep",
        ),
        pytest.param(
            "  quantization: nf4",
            "  quantisation: nf4",
            "quantisation:",
            "unknown key 'model.quantisation'; did you mean 'model.quantization'?",
        ),
        pytest.param("seed: 0", "seeed: 0", "seeed:", "unknown key 'seeed'; did you mean 'seed'?"),
        pytest.param(
            "  lr: 2.0e-4",
            "  learning_rate: 2.0e-4",
            "learning_rate:",
            "unknown key 'sft.learning_rate'; did you mean 'sft.lr'?",
            id="alias",
        ),
        pytest.param(
            "  r: 16",
            "  rank: 16",
            "rank:",
            "unknown key 'lora.rank'; known keys here: r, alpha, dropout, target_modules",
        ),
        pytest.param(
            "seed: 0", "seed: 0\nepochs: 2", "epochs:", "unknown key 'epochs'; did you mean 'sft.epochs'?"
        ),
        pytest.param(
            "seed: 0",
            "seed: 0\nbatch_size: 2",
            "batch_size: 2",
            "unknown key 'batch_size'; did you mean 'sft.batch_size'?",
        ),
        pytest.param(
            "seed: 0",
            "seed: 0\nlr: 1.0e-4",
            "lr: 1.0e-4",
            "unknown key 'lr'; did you mean 'sft.lr'?",
            id="lr-at-top-level",
        ),
        pytest.param(
            "seed: 0",
            "seed: 0\ndropout: 0.1",
            "dropout: 0.1",
            "unknown key 'dropout'; did you mean 'lora.dropout'?",
            id="dropout-at-top-level",
        ),
    ],
)
def test_unknown_keys_name_file_line_and_a_suggestion(tmp_path, old, new, needle, expected):
    assert old in BLOCK
    text = BLOCK.replace(old, new, 1)
    path = write(tmp_path, text)
    message = load_error(path)
    assert message == f"{path}:{line_of(text, needle)}: {expected}"


def test_unknown_key_inside_a_flow_mapping_names_its_line(tmp_path):
    text = CONTRACT.replace("double_quant: true", "double_quantt: true")
    path = write(tmp_path, text)
    message = load_error(path)
    line = line_of(text, "double_quantt")
    assert message == f"{path}:{line}: unknown key 'model.double_quantt'; did you mean 'model.double_quant'?"


def test_missing_required_key_names_the_file_and_key(tmp_path):
    text = BLOCK.replace("name: my-run\n", "")
    path = write(tmp_path, text)
    message = load_error(path)
    assert message.startswith(str(path)) and "missing required key 'name'" in message


# ----------------------------------------------------------------------------------------------------------
# --set overrides


def test_set_overrides_parse_values_as_yaml(tmp_path):
    text = BLOCK.replace("eval: null", "eval: data/eval.jsonl")
    path = write(tmp_path, text, data=("data/sft.jsonl", "data/eval.jsonl"))
    recipe = load_recipe(
        path, ["sft.lr=1e-4", "lora.r=8", "sft.data.eval=null", "lora.target_modules=[q_proj, v_proj]"]
    )
    assert recipe.sft is not None
    assert isinstance(recipe.sft.lr, float) and recipe.sft.lr == 0.0001
    assert recipe.lora.r == 8 and isinstance(recipe.lora.r, int)
    assert recipe.sft.data.eval is None
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    # The file is untouched.
    assert path.read_text(encoding="utf-8") == text
    assert load_recipe(path).sft.data.eval == str((tmp_path / "data" / "eval.jsonl").resolve())


def test_set_can_add_new_nested_keys_and_sections(tmp_path):
    path = write(tmp_path, BLOCK)
    recipe = load_recipe(
        path, ["merge.dtype=fp16", "sft.data.eval_split=validation", "sft.overlong=truncate"]
    )
    assert recipe.merge is not None and recipe.merge.dtype == "fp16"
    assert recipe.merge.base_weights == "nf4-roundtrip"
    assert recipe.sft is not None
    assert recipe.sft.data.eval_split == "validation" and recipe.sft.overlong == "truncate"


def test_set_value_may_contain_equals_signs(tmp_path):
    recipe = load_recipe(write(tmp_path, BLOCK), ["name=a=b"])
    assert recipe.name == "a=b"


@pytest.mark.parametrize("item", ["foo", "=1", "sft..lr=1", ".lr=1", "sft.=1", ""])
def test_malformed_set_is_an_error_naming_it(tmp_path, item):
    message = load_error(write(tmp_path, BLOCK), [item])
    assert message.startswith(f"--set {item}: ")
    assert "KEY=VALUE" in message


def test_set_below_a_value_is_an_error(tmp_path):
    message = load_error(write(tmp_path, BLOCK), ["sft.lr.x=1"])
    assert message.startswith("--set sft.lr.x=1: ")
    assert "'sft.lr' is a value, not a section" in message


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("sft.batch_size=0", "--set sft.batch_size: sft.batch_size: Input should be greater than 0 (got 0)"),
        ("sft.lr=-1", "--set sft.lr: sft.lr: Input should be greater than 0 (got -1)"),
        ("sft.lr=.nan", "--set sft.lr: sft.lr: Input should be a finite number (got nan)"),
        ("sft.lrr=1", "--set sft.lrr: unknown key 'sft.lrr'; did you mean 'sft.lr'?"),
        ("model.quantization=int3", "--set model.quantization: model.quantization: Input should be"),
        ("name=", "--set name: name: String should have at least 1 character"),
    ],
)
def test_errors_caused_by_an_override_name_the_override(tmp_path, item, expected):
    message = load_error(write(tmp_path, BLOCK), [item])
    assert message.startswith(expected)


def test_a_missing_file_given_by_set_names_the_override(tmp_path):
    message = load_error(write(tmp_path, BLOCK), ["sft.data.eval=data/missing.jsonl"])
    assert "--set sft.data.eval" in message


def test_an_error_from_the_file_is_not_blamed_on_an_unrelated_override(tmp_path):
    text = BLOCK.replace("  batch_size: 4", "  batch_size: 0")
    path = write(tmp_path, text)
    message = load_error(path, ["sft.lr=1e-4"])
    assert message.startswith(f"{path}:{line_of(text, 'batch_size: 0')}: sft.batch_size:")


# ----------------------------------------------------------------------------------------------------------
# Hostile YAML


@pytest.mark.parametrize(
    ("text", "where", "problem"),
    [
        ("name: x\nmodel: [a\n", "3:1", "expected ',' or ']'"),
        ("name: x\n\tmodel: y\n", "2:1", "'\\t'"),
        ('name: "unclosed\nmodel: x\n', "3:1", "found unexpected end of stream"),
    ],
)
def test_malformed_yaml_names_file_line_and_column(tmp_path, text, where, problem):
    path = write(tmp_path, text, data=())
    message = load_error(path)
    assert message.startswith(f"{path}:{where}: invalid YAML")
    assert problem in message


def test_python_tags_are_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    text = f'name: !!python/object/apply:os.system ["touch {marker}"]\nmodel: {{base: org/model}}\n'
    path = write(tmp_path, text, data=())
    message = load_error(path)
    assert message.startswith(f"{path}:1:7: invalid YAML")
    assert "python/object/apply:os.system" in message
    assert not marker.exists()


def test_python_tags_in_overrides_are_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = write(tmp_path, BLOCK)
    # An unparseable override value is taken as a plain string, never constructed.
    recipe = load_recipe(path, [f'name=!!python/object/apply:os.system ["touch {marker}"]'])
    assert not marker.exists()
    assert "os.system" in recipe.name


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_an_empty_recipe_is_an_error(tmp_path, text):
    path = write(tmp_path, text, data=())
    message = load_error(path)
    assert message.startswith(f"{path}: ") and "empty" in message


@pytest.mark.parametrize(
    ("text", "kind"), [("- name: x\n- model: y\n", "list"), ("42\n", "int"), ("hi\n", "str")]
)
def test_a_recipe_that_is_not_a_mapping_is_an_error(tmp_path, text, kind):
    path = write(tmp_path, text, data=())
    message = load_error(path)
    assert message.startswith(f"{path}: ") and "mapping" in message and kind in message


def test_a_recipe_that_is_not_utf8_is_an_error(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"name: caf\xe9\nmodel: {base: org/model}\n")
    message = load_error(path)
    assert message.startswith(f"{path}: ")


# ----------------------------------------------------------------------------------------------------------
# Invalid values


@pytest.mark.parametrize(
    ("old", "new", "key", "got"),
    [
        ("  batch_size: 4", "  batch_size: 0", "sft.batch_size", "(got 0)"),
        ("  batch_size: 4", "  batch_size: -1", "sft.batch_size", "(got -1)"),
        ("  lr: 2.0e-4", "  lr: .nan", "sft.lr", "(got nan)"),
        ("  lr: 2.0e-4", "  lr: -1", "sft.lr", "(got -1)"),
        ("  lr: 2.0e-4", "  lr: .inf", "sft.lr", "(got inf)"),
        ("  dropout: 0.05", "  dropout: 1.5", "lora.dropout", "(got 1.5)"),
        ("  quantization: nf4", "  quantization: int3", "model.quantization", "(got 'int3')"),
        ("  scheduler: cosine", "  scheduler: foo", "sft.scheduler", "(got 'foo')"),
        ("  target_modules: all-linear", "  target_modules: []", "lora.target_modules", "(got [])"),
        ("  max_length: 1024", "  max_length: 0", "sft.max_length", "(got 0)"),
        ("  epochs: 1", "  epochs: two", "sft.epochs", "(got 'two')"),
        ("  warmup_ratio: 0.03", "  warmup_ratio: 1", "sft.warmup_ratio", "(got 1)"),
        ("  r: 16", "  r: 0", "lora.r", "(got 0)"),
        ("    format: auto", "    format: csv", "sft.data.format", "(got 'csv')"),
    ],
)
def test_invalid_values_name_file_line_and_key(tmp_path, old, new, key, got):
    assert old in BLOCK
    text = BLOCK.replace(old, new, 1)
    path = write(tmp_path, text)
    message = load_error(path)
    line = line_of(text, new.strip())
    assert message.startswith(f"{path}:{line}: {key}: ")
    assert got in message
    assert "more problem" not in message


# ----------------------------------------------------------------------------------------------------------
# The resolved dump


def test_to_yaml_round_trips_to_an_equal_recipe(tmp_path):
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "chat.jinja").write_text("{{ messages }}", encoding="utf-8")
    text = (
        BLOCK.replace("base: Qwen/Qwen2.5-0.5B-Instruct", "base: models/tiny")
        .replace("chat_template: null", "chat_template: chat.jinja")
        .replace("eval: null", "eval: data/eval.jsonl")
        .replace("  target_modules: all-linear", "  target_modules: [q_proj, v_proj]")
        .replace("  lr: 2.0e-4", "  lr: 1.0e-5")
        + "merge:\n  dtype: fp16\n  out: merged\n"
        + "dpo:\n  data:\n    train: data/dpo.jsonl\n  beta: 0.2\n"
    )
    path = write(tmp_path, text, data=("data/sft.jsonl", "data/eval.jsonl", "data/dpo.jsonl"))
    recipe = load_recipe(path)
    dumped = recipe.to_yaml()
    again = parse_recipe(dumped, path, [])
    assert again == recipe
    assert again.to_yaml() == dumped
    # Written beside the outputs (another folder), it still means the same run: every path is absolute.
    out = tmp_path / "runs" / "elsewhere"
    out.mkdir(parents=True)
    moved = parse_recipe(dumped, out / "recipe.yaml", [])
    assert moved.model_dump() == recipe.model_dump()


def test_to_yaml_of_the_contract_round_trips(tmp_path):
    recipe = load_recipe(write(tmp_path, CONTRACT))
    assert parse_recipe(recipe.to_yaml(), recipe.source, []) == recipe


def test_a_duplicate_key_is_an_error_naming_both_lines(tmp_path):
    text = BLOCK.replace("  batch_size: 4", "  batch_size: 4\n  batch_size: 8")
    path = write(tmp_path, text)
    message = load_error(path)
    first = line_of(text, "batch_size: 4")
    assert message == (
        f"{path}:{first + 1}: duplicate key 'sft.batch_size' (first set on line {first}); keep one"
    )
