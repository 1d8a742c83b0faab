"""Every input a user controls, broken on purpose: exit code 2, one line naming the file/line/key, no traceback,
and nothing already on disk changed. Runs the CLI in-process (same code path as the console script) for speed."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import add_dpo, write_recipe
from typer.testing import CliRunner

from qalign.cli import app

runner = CliRunner()


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def setup(tmp_path, tiny_model):
    """A valid recipe (sft + dpo) and an output folder that already holds a finished-looking sft adapter."""
    recipe = add_dpo(write_recipe(tmp_path, tiny_model("llama"), max_steps=2))
    out = tmp_path / "runs" / "tiny"
    (out / "sft" / "adapter").mkdir(parents=True)
    (out / ".qalign-run").write_text("{}\n")
    (out / "sft" / "adapter" / "adapter_model.safetensors").write_bytes(b"precious weights")
    return tmp_path, recipe


def edit_recipe(change: Callable[[dict], None]) -> Callable[[Path, Path], None]:
    def apply(folder: Path, recipe: Path) -> None:
        data = yaml.safe_load(recipe.read_text())
        change(data)
        recipe.write_text(yaml.safe_dump(data, sort_keys=False))

    return apply


def write_text(name: str, text: str | bytes) -> Callable[[Path, Path], None]:
    def apply(folder: Path, recipe: Path) -> None:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)

    return apply


def jsonl(*rows: object) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
PAIR = {"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."}


def model_folder(kind: str) -> Callable[[Path, Path], None]:
    def apply(folder: Path, recipe: Path) -> None:
        import shutil

        data = yaml.safe_load(recipe.read_text())
        src = Path(data["model"]["base"])
        dst = folder / f"model-{kind}"
        shutil.copytree(src, dst)
        if kind == "no-config":
            (dst / "config.json").unlink()
        elif kind == "pickle-only":
            import torch
            from safetensors.torch import load_file

            torch.save(load_file(dst / "model.safetensors"), dst / "pytorch_model.bin")
            (dst / "model.safetensors").unlink()
        elif kind == "corrupt":
            (dst / "model.safetensors").write_bytes(b"\x00\x01 this is not a safetensors file" * 10)
        data["model"]["base"] = str(dst)
        recipe.write_text(yaml.safe_dump(data, sort_keys=False))

    return apply


# (id, command (+ flags), how to break the inputs, text the one-line message must contain). The model cases pass
# --overwrite to get past the finished adapter the fixture leaves: they must fail on the model, before training.
CASES = [
    ("malformed-yaml", "sft", write_text("recipe.yaml", "name: x\nmodel: [unclosed\n"), "recipe.yaml:"),
    (
        "python-tag",
        "sft",
        write_text("recipe.yaml", "name: !!python/object/apply:os.system ['echo pwned']\n"),
        "recipe.yaml:1",
    ),
    ("not-a-mapping", "sft", write_text("recipe.yaml", "- a\n- b\n"), "mapping"),
    ("empty-recipe", "sft", write_text("recipe.yaml", ""), "empty"),
    ("unknown-key", "sft", edit_recipe(lambda d: d["sft"].update(learning_rate=1)), "did you mean"),
    ("mistyped-key", "sft", edit_recipe(lambda d: d["lora"].update(rr=8)), "lora.rr"),
    ("zero-batch", "sft", edit_recipe(lambda d: d["sft"].update(batch_size=0)), "sft.batch_size"),
    ("negative-length", "sft", edit_recipe(lambda d: d["sft"].update(max_length=-5)), "sft.max_length"),
    ("nan-lr", "sft", edit_recipe(lambda d: d["sft"].update(lr=float("nan"))), "sft.lr"),
    ("string-steps", "sft", edit_recipe(lambda d: d["sft"].update(max_steps="many")), "sft.max_steps"),
    ("bad-enum", "sft", edit_recipe(lambda d: d["model"].update(quantization="int3")), "model.quantization"),
    ("missing-data", "sft", edit_recipe(lambda d: d["sft"]["data"].update(train="nope.jsonl")), "nope.jsonl"),
    ("missing-model", "sft", edit_recipe(lambda d: d["model"].update(base="./no-model")), "model.base"),
    (
        "missing-template",
        "sft",
        edit_recipe(lambda d: d["model"].update(chat_template="t.jinja")),
        "chat_template",
    ),
    (
        "missing-init-adapter",
        "dpo",
        edit_recipe(lambda d: d["dpo"].update(init_adapter="nowhere")),
        "dpo.init_adapter",
    ),
    (
        "invalid-utf8",
        "sft",
        write_text("data/train.jsonl", jsonl(GOOD).encode() + b'{"messages": "\xff\xfe"}\n'),
        "train.jsonl:2",
    ),
    (
        "truncated-line",
        "sft",
        write_text("data/train.jsonl", jsonl(GOOD, '{"messages": [{"role": "us')),
        "train.jsonl:2",
    ),
    ("non-object-row", "sft", write_text("data/train.jsonl", jsonl(GOOD, [1, 2])), "train.jsonl:2"),
    (
        "missing-field",
        "sft",
        write_text("data/train.jsonl", jsonl(GOOD, {"messages": [{"role": "user"}]})),
        "train.jsonl:2",
    ),
    (
        "null-content",
        "sft",
        write_text("data/train.jsonl", jsonl(GOOD, {"messages": [{"role": "user", "content": None}]})),
        "train.jsonl:2",
    ),
    (
        "wrong-type",
        "sft",
        write_text("data/train.jsonl", jsonl(GOOD, {"messages": "hello"})),
        "train.jsonl:2",
    ),
    (
        "empty-reply",
        "sft",
        write_text("data/train.jsonl", jsonl(GOOD, {"prompt": "q", "completion": ""})),
        "train.jsonl:2",
    ),
    (
        "roles-out-of-order",
        "sft",
        write_text("data/train.jsonl", jsonl(GOOD, {"messages": [GOOD["messages"][1], GOOD["messages"][0]]})),
        "train.jsonl:2",
    ),
    (
        "unknown-format",
        "sft",
        write_text("data/train.jsonl", jsonl({"question": "q", "answer": "a"})),
        "train.jsonl:1",
    ),
    ("empty-file", "sft", write_text("data/train.jsonl", ""), "train.jsonl"),
    ("blank-lines-only", "sft", write_text("data/train.jsonl", "\n\n"), "train.jsonl"),
    (
        "chosen-equals-rejected",
        "dpo",
        write_text("data/dpo.jsonl", jsonl(PAIR, {**PAIR, "rejected": PAIR["chosen"]})),
        "dpo.jsonl:2",
    ),
    (
        "pair-missing-rejected",
        "dpo",
        write_text("data/dpo.jsonl", jsonl({"prompt": "a", "chosen": "b"})),
        "dpo.jsonl:1",
    ),
    ("model-without-config", "sft --overwrite", model_folder("no-config"), "model.base"),
    ("pickle-only-model", "sft --overwrite", model_folder("pickle-only"), "allow_pickle"),
    ("corrupt-safetensors", "sft --overwrite", model_folder("corrupt"), "model.base"),
    ("output-is-a-file", "sft", edit_recipe(lambda d: d.update(output_dir="recipe.yaml")), "output_dir"),
    ("foreign-output-dir", "sft", edit_recipe(lambda d: d.update(output_dir="data")), "not a qalign run"),
]


@pytest.mark.parametrize(
    ("command", "breakage", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_hostile_input_is_refused_cleanly(setup, command, breakage, expected):
    folder, recipe = setup
    breakage(folder, recipe)
    before = snapshot(folder)
    verb, *flags = command.split()
    result = runner.invoke(app, [verb, str(recipe), *flags], catch_exceptions=True)
    assert result.exit_code == 2, (result.output, result.exception)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), (
        result.exception
    )
    message = result.output.strip()
    assert "Traceback" not in message
    assert expected in message, message
    assert len([line for line in message.splitlines() if line.startswith("error:")]) == 1, message
    assert snapshot(folder) == before  # nothing on disk changed, the existing adapter included


def test_python_tags_are_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 2 and not marker.exists()


def test_pickle_weights_load_when_the_recipe_opts_in(setup):
    folder, recipe = setup
    model_folder("pickle-only")(folder, recipe)
    result = runner.invoke(app, ["validate", str(recipe), "--set", "model.allow_pickle=true"])
    assert result.exit_code == 0, result.output  # validate needs only the tokenizer; loading is checked below
    import torch

    from qalign.model import load_base
    from qalign.recipe_load import load_recipe

    spec = load_recipe(recipe, ["model.allow_pickle=true"]).model
    assert load_base(spec, torch.device("cpu")) is not None


def test_a_hub_id_without_a_network_fails_fast_with_what_to_do(tmp_path):
    from test_cli_sft import ENV

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "name: hub\nmodel:\n  base: Qwen/Qwen2.5-0.5B-Instruct\nsft:\n  data:\n    train: d.jsonl\n"
    )
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    # A closed port on this machine stands in for a hub nobody can reach; the cache is empty.
    env = {k: v for k, v in ENV.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env |= {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(
        [sys.executable, "-m", "qalign", "validate", str(recipe)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "cannot be reached" in done.stderr and "HF_HUB_OFFLINE=1" in done.stderr
    assert "Traceback" not in done.stderr
