"""Tool turns in OpenAI-style messages (tool_calls, `tool` turns and the legacy `function_call` / `function`
turns) reach templates that render them and are never trained; a template that refuses them or drops them
without a word is an error naming the row, the turn and the template's limitation."""

from __future__ import annotations

import pytest
from template_zoo import FAMILIES, family_tokenizer
from test_published_templates import RESULT, trained_runs

from qalign.chat_template import IGNORE
from qalign.data import Row, to_conversation, to_messages
from qalign.dpo import prepare_dpo
from qalign.errors import UserError
from qalign.sft import prepare_sft

WHERE = "tools.jsonl:4"
QUESTION = {"role": "user", "content": "Weather in Paris?"}
CALL = {
    "id": "call00001",
    "type": "function",
    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
}
ANSWER = "It is 18 degrees in Paris."
LEGACY = [
    QUESTION,
    {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
    {"role": "function", "name": "get_weather", "content": RESULT},
    {"role": "assistant", "content": ANSWER},
]  # fmt: skip


def test_legacy_function_turns_are_tool_turns_with_their_name_and_a_call_id():
    messages = to_messages(Row(WHERE, {"messages": LEGACY}), "messages")
    call = messages[1]["tool_calls"][0]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert len(call["id"]) == 9 and call["id"].isalnum()
    assert messages[2] == {
        "role": "tool",
        "content": RESULT,
        "tool_call_id": call["id"],
        "name": "get_weather",
    }
    assert to_messages(Row(WHERE, {"messages": LEGACY}), "messages") == messages  # the same id every run
    with pytest.raises(
        UserError, match=r"messages\[2\].role 'robot' is not one of system, user, assistant, tool, "
    ):
        to_messages(
            Row(WHERE, {"messages": [QUESTION, LEGACY[1], {"role": "robot", "content": "x"}]}), "messages"
        )


@pytest.mark.parametrize("family", [name for name, spec in FAMILIES.items() if spec.tools])
def test_legacy_function_turns_render_and_are_never_trained(family):
    tokenizer = family_tokenizer(family)
    examples, _ = prepare_sft(
        [Row(WHERE, {"messages": LEGACY})], "messages", tokenizer, 4096, "drop", "t.jsonl"
    )
    shown = tokenizer.decode(examples[0].input_ids)
    runs = [run for e in examples for run in trained_runs(tokenizer, e.input_ids, e.labels)]
    assert RESULT in shown and "get_weather" in shown
    assert not any(RESULT in run for run in runs)
    assert any("get_weather" in run for run in runs) and any(ANSWER in run for run in runs)


TOOL_PROMPT = {
    "prompt": [QUESTION, {"role": "assistant", "content": None, "tool_calls": [CALL]},
               {"role": "tool", "tool_call_id": "call00001", "content": RESULT}],
    "chosen": ANSWER,
    "rejected": "I cannot check the weather.",
}  # fmt: skip


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_pair_after_tool_turns_sees_them_or_names_what_the_template_cannot_show(family):
    """A pair's prompt is never located turn by turn, so a template that drops tool turns (Phi-3.5, OLMo-2)
    or the call (SmolLM2, Phi-4-mini) rendered without complaint and trained replies to results the model
    never saw."""
    tokenizer = family_tokenizer(family)
    rows = [Row(WHERE, TOOL_PROMPT)]
    if not FAMILIES[family].tools:
        with pytest.raises(UserError) as caught:
            prepare_dpo(rows, tokenizer, 4096, "drop", "t.jsonl")
        message = str(caught.value)
        assert message.startswith(f"{WHERE}: turn "), message
        assert any(
            limit in message
            for limit in (
                "(assistant): this model's chat template does not show tool calls",
                "(tool): this model's chat template does not show tool results",
                "(tool): this model's chat template does not take tool calls or tool results",
            )
        ), message
        return
    (example,), _ = prepare_dpo(rows, tokenizer, 4096, "drop", "t.jsonl")
    assert RESULT in tokenizer.decode(example.prompt_ids)
    trained = [
        t for t, label in zip(example.chosen_ids, example.chosen_labels, strict=True) if label != IGNORE
    ]
    assert ANSWER in tokenizer.decode(trained) and RESULT not in tokenizer.decode(trained)


@pytest.mark.parametrize("family", ["phi3.5", "olmo2"])
def test_templates_that_drop_tool_results_are_named(family):
    tokenizer = family_tokenizer(family)
    # The call is in the prompt; the template writes neither it nor the result.
    with pytest.raises(UserError, match=rf"^{WHERE}: turn 1 \(assistant\): this model's chat template does not "
                       r"show tool calls \(use a model whose template renders them"):  # fmt: skip
        prepare_dpo([Row(WHERE, TOOL_PROMPT)], tokenizer, 4096, "drop", "t.jsonl")
    # An SFT row whose tool-calling turn is context (TRL's conversational prompt) is checked the same way.
    data = {"prompt": TOOL_PROMPT["prompt"], "completion": [{"role": "assistant", "content": ANSWER}]}
    conversation = to_conversation(Row(WHERE, data), "prompt_completion")
    assert conversation.trained_from == 3
    with pytest.raises(
        UserError, match=rf"^{WHERE}: turn 1 \(assistant\): this model's chat template does not"
    ):
        prepare_sft([Row(WHERE, data)], "prompt_completion", tokenizer, 4096, "drop", "t.jsonl")


def test_a_template_that_shows_calls_but_drops_results_is_named():
    """No published template in the zoo does this alone; a ChatML template that skips tool turns does."""
    tokenizer = family_tokenizer("qwen2.5")
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m.role != 'tool' %}<|im_start|>{{ m.role }}\n{{ m.content or '' }}"
        "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }}</tool_call>{% endfor %}<|im_end|>\n"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(UserError, match=rf"^{WHERE}: turn 2 \(tool\): this model's chat template does not show "
                       r"tool results: the result is missing from the rendered conversation"):  # fmt: skip
        prepare_dpo([Row(WHERE, TOOL_PROMPT)], tokenizer, 4096, "drop", "t.jsonl")
