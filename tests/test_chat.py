"""qalign chat on a tiny model: one-shot answers for scripts, and an interactive session with history."""

from __future__ import annotations

import io

import pytest
from conftest import write_recipe
from rich.console import Console
from test_cli_sft import qalign

from qalign.chat import chat
from qalign.errors import UserError


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("chat")
    recipe = write_recipe(folder, tiny_model("llama"), max_steps=12, save_every=0, eval_every=0, lr=1e-2)
    assert qalign("sft", str(recipe), cwd=folder).returncode == 0
    return folder, recipe


def test_chat_prompt_prints_a_completion_and_exits_0(trained):
    folder, recipe = trained
    result = qalign("chat", str(recipe), "--prompt", "What is 3 + 4?", "--max-new-tokens", "8", "--seed", "0",
                    cwd=folder)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


@pytest.mark.parametrize("kind", ["recipe", "adapter", "plain-model", "base-stage"])
def test_every_kind_of_target_answers(trained, tiny_model, kind):
    folder, recipe = trained
    target = {
        "recipe": recipe,
        "adapter": folder / "runs" / "tiny" / "sft" / "adapter",
        "plain-model": tiny_model("llama"),
        "base-stage": recipe,
    }[kind]
    out = io.StringIO()
    stage = "base" if kind == "base-stage" else None
    session = chat(target, stage, "What is 3 + 4?", 0.0, 1.0, 6, None, Console(file=out))
    assert out.getvalue().strip()
    assert [m["role"] for m in session.history] == ["user", "assistant"]


def test_sampling_with_a_seed_is_reproducible(trained):
    _, recipe = trained
    texts = []
    for _ in range(2):
        out = io.StringIO()
        chat(recipe, None, "What is 2 + 2?", 1.0, 0.95, 10, 123, Console(file=out))
        texts.append(out.getvalue())
    assert texts[0] == texts[1] and texts[0].strip()


def test_interactive_history_reset_and_exit(trained):
    _, recipe = trained
    typed = iter(["What is 1 + 1?", "And 2 + 2?", "/reset", "", "What is 5 + 5?", "/exit", "never read"])
    out = io.StringIO()

    def fake_input(prompt: str) -> str:
        return next(typed)

    session = chat(recipe, None, None, 0.0, 1.0, 5, None, Console(file=out), input_fn=fake_input)
    assert len(session.history) == 2  # only the turn after /reset remains
    assert session.history[0]["content"] == "What is 5 + 5?"
    assert "conversation cleared" in out.getvalue()
    assert next(typed) == "never read"  # /exit stopped reading


def test_a_stage_without_an_adapter_or_a_stray_folder_is_a_user_error(trained, tmp_path):
    _, recipe = trained
    with pytest.raises(UserError, match="no adapter from the dpo stage"):
        chat(recipe, "dpo", "hi", 0.0, 1.0, 4, None, Console(file=io.StringIO()))
    with pytest.raises(UserError, match="not a recipe"):
        chat(tmp_path, None, "hi", 0.0, 1.0, 4, None, Console(file=io.StringIO()))
