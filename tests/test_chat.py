"""qalign chat on a tiny model: one-shot answers for scripts, and an interactive session with history."""

from __future__ import annotations

import io
import json
import re

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
    adapter = recipe.parent / "runs" / "tiny" / "sft" / "adapter"
    with pytest.raises(UserError, match="only a recipe has stages"):
        chat(adapter, "sft", "hi", 0.0, 1.0, 4, None, Console(file=io.StringIO()))


def test_a_system_turn_starts_the_conversation_and_survives_reset(trained):
    from qalign.chat import ChatSession, load_target

    _, recipe = trained
    model, tokenizer, _ = load_target(recipe, None, None, lambda m: None)
    session = ChatSession(model, tokenizer, 0.0, 1.0, 3, None, system="Answer in one word.")
    "".join(session.reply("What is 1 + 1?"))
    assert [m["role"] for m in session.history] == ["system", "user", "assistant"]
    session.reset()
    assert session.history == [{"role": "system", "content": "Answer in one word."}]


def test_session_keeps_alternating_turns_and_an_abandoned_reply_leaves_no_trace(trained, tiny_model):
    from qalign.chat import ChatSession, load_target

    _, recipe = trained
    model, tokenizer, _ = load_target(recipe, None, None, lambda m: None)
    session = ChatSession(model, tokenizer, 0.0, 1.0, 5, None)
    "".join(session.reply("What is 1 + 1?"))
    assert [m["role"] for m in session.history] == ["user", "assistant"]
    "".join(session.reply("And 2 + 2?"))
    assert [m["role"] for m in session.history] == ["user", "assistant"] * 2

    # The untrained tiny model never stops on its own when greedy, so only cancelling can end it early.
    model, tokenizer, _ = load_target(tiny_model("llama"), None, None, lambda m: None)
    session = ChatSession(model, tokenizer, 0.0, 1.0, 2000, None)
    generate, lengths = model.generate, []
    model.generate = lambda **kwargs: lengths.append(
        generate(**kwargs).shape[1] - kwargs["input_ids"].shape[1]
    )
    pieces = session.reply("What is 3 + 3?")
    next(pieces)
    pieces.close()  # what Ctrl-C mid-reply does: generation stops, the unanswered turn is dropped
    assert lengths and lengths[0] < 100 and session.history == []


def test_ctrl_c_mid_reply_drops_the_turn_and_the_chat_goes_on(trained):
    class InterruptFirstPiece(io.StringIO):
        armed = False

        def write(self, text: str) -> int:
            if self.armed:
                self.armed = False
                raise KeyboardInterrupt
            self.armed = text == "assistant> " and "interrupted" not in self.getvalue()
            return super().write(text)

    _, recipe = trained
    typed = iter(["What is 1 + 1?", "What is 5 + 5?", "/exit"])
    out = InterruptFirstPiece()
    try:
        session = chat(
            recipe, None, None, 0.0, 1.0, 5, None, Console(file=out), input_fn=lambda p: next(typed)
        )
    except KeyboardInterrupt:  # escaping would abort the whole pytest session
        pytest.fail("Ctrl-C during a reply ended the chat")
    assert "reply interrupted" in out.getvalue()
    assert [m["content"] for m in session.history][:1] == ["What is 5 + 5?"] and len(session.history) == 2


def test_folders_missing_a_tokenizer_or_template_still_chat_with_a_warning(trained, tiny_model, tmp_path):
    import shutil

    folder, _ = trained
    adapter = shutil.copytree(folder / "runs" / "tiny" / "sft" / "adapter", tmp_path / "bare-adapter")
    for path in adapter.iterdir():
        if path.name not in ("adapter_config.json", "adapter_model.safetensors", "qalign.json"):
            path.unlink()
    plain = shutil.copytree(tiny_model("llama"), tmp_path / "no-template")
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    for path in plain.glob("chat_template.*"):
        path.unlink()
    for target, expected in ((adapter, "using the base's"), (plain, "using ChatML")):
        warnings, out = [], io.StringIO()
        chat(target, None, "hi", 0.0, 1.0, 4, None, Console(file=out), warn=warnings.append)
        assert out.getvalue().strip() and any(expected in w for w in warnings), warnings


def test_unloadable_targets_are_one_line_user_errors(trained, tiny_model, tmp_path):
    import shutil

    folder, _ = trained
    corrupt = shutil.copytree(tiny_model("llama"), tmp_path / "corrupt")
    next(corrupt.glob("*.safetensors")).write_bytes(b"not safetensors")
    orphan = shutil.copytree(folder / "runs" / "tiny" / "sft" / "adapter", tmp_path / "orphan")
    (orphan / "qalign.json").unlink(missing_ok=True)
    config = json.loads((orphan / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "deleted-base")
    (orphan / "adapter_config.json").write_text(json.dumps(config))
    cases = [(corrupt, "cannot load the model"), (orphan, "orphan (adapter)"), (tmp_path / "nope", "no such")]
    for target, expected in cases:
        with pytest.raises(UserError, match=re.escape(expected)) as caught:
            chat(target, None, "hi", 0.0, 1.0, 4, None, Console(file=io.StringIO()))
        assert "\n" not in str(caught.value)
