"""Vendors' published chat templates x every data format: the trained tokens, decoded turn by turn, are
exactly each assistant reply as the rendered conversation shows it plus the token(s) that close the turn;
the final reply's prompt is the very token sequence `qalign chat` sends; refusals name the row and the turn."""

from __future__ import annotations

import json

import pytest
from template_zoo import FAMILIES, family_tokenizer

from qalign.chat_template import IGNORE, end_of_turn_ids, prompt_ids, render_conversation
from qalign.data import Row, to_conversation
from qalign.dpo import prepare_dpo, split_preference
from qalign.errors import UserError
from qalign.sft import prepare_sft

WHERE = "data.jsonl:3"
SYSTEM = "Answer briefly."
Q1, A1, Q2, A2 = "What is 2 + 3?", "The answer is 5.", "And 4 + 4?", "It is 8."
CALL = {
    "id": "call00001",
    "type": "function",
    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
}
RESULT = "18 degrees and sunny"
AFTER_TOOL = "It is 18 degrees in Paris."


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


SFT_ROWS = {
    "messages": ({"messages": [user(Q1), assistant(A1)]}, [A1]),
    "messages+system": ({"messages": [{"role": "system", "content": SYSTEM}, user(Q1), assistant(A1)]}, [A1]),
    "multi-turn": ({"messages": [user(Q1), assistant(A1), user(Q2), assistant(A2)]}, [A1, A2]),
    "sharegpt+system": (
        {
            "system": SYSTEM,
            "conversations": [
                {"from": "human", "value": Q1},
                {"from": "gpt", "value": A1},
                {"from": "human", "value": Q2},
                {"from": "gpt", "value": A2},
            ],
        },
        [A1, A2],
    ),
    "alpaca": ({"instruction": "Add the numbers.", "input": "2 and 3", "output": A1}, [A1]),
    "prompt_completion": ({"prompt": Q1, "completion": A1}, [A1]),
    "conversational prompt_completion": (
        {"prompt": [user(Q1), assistant(A1), user(Q2)], "completion": [assistant(A2)]},
        [A2],
    ),
    "openai tools": (
        {
            "messages": [
                user("Weather in Paris?"),
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call00001", "content": RESULT},
                assistant(AFTER_TOOL),
            ]
        },
        ["<call>", AFTER_TOOL],
    ),
    "sharegpt function_call": (
        {
            "conversations": [
                {"from": "human", "value": "Weather in Paris?"},
                {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
                {"from": "observation", "value": RESULT},
                {"from": "gpt", "value": AFTER_TOOL},
            ]
        },
        ["<call>", AFTER_TOOL],
    ),
}  # fmt: skip
FORMAT_OF = {
    "messages": "messages",
    "messages+system": "messages",
    "multi-turn": "messages",
    "sharegpt+system": "sharegpt",
    "alpaca": "alpaca",
    "prompt_completion": "prompt_completion",
    "conversational prompt_completion": "prompt_completion",
    "openai tools": "messages",
    "sharegpt function_call": "sharegpt",
}
DPO_ROWS = {
    "dpo prompt/chosen/rejected strings": {"prompt": Q1, "chosen": A1, "rejected": "It is 6."},
    "dpo explicit (TRL message lists)": {
        "prompt": [{"role": "system", "content": SYSTEM}, user(Q1)],
        "chosen": [assistant(A1)],
        "rejected": [assistant("It is 6.")],
    },
    "dpo implicit (two conversations)": {
        "chosen": [user(Q1), assistant(A1), user(Q2), assistant(A2)],
        "rejected": [user(Q1), assistant(A1), user(Q2), assistant("It is 9.")],
    },
}
WITH_SYSTEM = {"messages+system", "sharegpt+system", "dpo explicit (TRL message lists)"}
WITH_TOOLS = {"openai tools", "sharegpt function_call"}


def expected_outcome(family: str, fmt: str) -> str | None:
    """None when the row trains; otherwise a phrase the refusal must contain."""
    spec = FAMILIES[family]
    if fmt in WITH_SYSTEM and not spec.system:
        return "turn 0 (system): this model's chat template accepts no system turn"
    if fmt in WITH_TOOLS and not spec.tools:
        return "tool"
    return None


def prefix(family: str, final: bool) -> str:
    """What the template puts between the generation prompt and a reply's content, which the model writes."""
    if family == "qwen3" and final:
        return "<think>\n\n</think>\n\n"  # Qwen3 opens (and here closes) a reasoning block in the last turn
    if family == "mistral-v0.3":
        return " "
    return ""


def trained_runs(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        assert label in (token, IGNORE)
        if label != IGNORE:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def reply_starts(labels: list[int]) -> list[int]:
    return [j for j, label in enumerate(labels) if label != IGNORE and (j == 0 or labels[j - 1] == IGNORE)]


def last_reply_start(labels: list[int]) -> int:
    return reply_starts(labels)[-1]


def check_tool_call_run(run: str, end: str) -> None:
    assert "get_weather" in run and "Paris" in run and run.endswith(end), run
    assert RESULT not in run


@pytest.mark.parametrize("fmt", list(SFT_ROWS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_sft_trains_exactly_each_reply_and_its_end_of_turn(family, fmt):
    tokenizer = family_tokenizer(family)
    data, replies = SFT_ROWS[fmt]
    rows = [Row(WHERE, data)]
    refusal = expected_outcome(family, fmt)
    if refusal is not None:
        with pytest.raises(UserError) as caught:
            prepare_sft(rows, FORMAT_OF[fmt], tokenizer, 4096, "drop", "data.jsonl")
        assert str(caught.value).startswith(f"{WHERE}: ") and refusal in str(caught.value), str(caught.value)
        return
    examples, report = prepare_sft(rows, FORMAT_OF[fmt], tokenizer, 4096, "drop", "data.jsonl")
    (example,) = examples
    end = FAMILIES[family].end_of_turn
    runs = trained_runs(tokenizer, example.input_ids, example.labels)
    conversation = to_conversation(rows[0], FORMAT_OF[fmt])
    last_user = max(j for j, m in enumerate(conversation.messages) if m["role"] == "user")
    assistants = [j for j, m in enumerate(conversation.messages) if m["role"] == "assistant"]
    expected = [
        prefix(family, j > last_user and j == len(conversation.messages) - 1) + reply + end
        for j, reply in zip(assistants[-len(replies) :], replies, strict=True)
    ]
    assert report.turns_unmasked == 0 and len(runs) == len(expected), (runs, expected)
    for run, want in zip(runs, expected, strict=True):
        if want.endswith("<call>" + end):
            check_tool_call_run(run, end)
        else:
            assert run == want
    # Train as you infer: each reply's prompt is exactly what `qalign chat` sends for that history. Two
    # templates render history unlike their generation prompt, so only the final reply can be prompted so:
    # R1 opens "<think>" in the prompt but not in earlier turns, Mistral v0.3 shows the system turn in the
    # last user turn only.
    messages = conversation.messages
    starts = reply_starts(example.labels)
    checked = list(zip(starts, assistants[-len(replies) :], strict=True))
    if family.startswith("deepseek-r1") or (family == "mistral-v0.3" and messages[0]["role"] == "system"):
        checked = checked[-1:]
    for start, turn in checked:
        assert example.input_ids[:start] == prompt_ids(tokenizer, messages[:turn]), turn
    assert tokenizer.convert_tokens_to_ids(end) in end_of_turn_ids(tokenizer)


@pytest.mark.parametrize("fmt", list(DPO_ROWS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_dpo_trains_each_side_as_its_reply_and_end_of_turn(family, fmt):
    tokenizer = family_tokenizer(family)
    rows = [Row(WHERE, DPO_ROWS[fmt])]
    refusal = expected_outcome(family, fmt)
    if refusal is not None:
        with pytest.raises(UserError) as caught:
            prepare_dpo(rows, tokenizer, 4096, "drop", "pairs.jsonl")
        assert str(caught.value).startswith(f"{WHERE}: ") and refusal in str(caught.value), str(caught.value)
        return
    (example,), _ = prepare_dpo(rows, tokenizer, 4096, "drop", "pairs.jsonl")
    prompt, chosen, rejected = split_preference(rows[0])
    end = FAMILIES[family].end_of_turn
    head = prefix(family, final=True)
    assert trained_runs(tokenizer, example.chosen_ids, example.chosen_labels) == [
        head + chosen["content"] + end
    ]
    assert trained_runs(tokenizer, example.rejected_ids, example.rejected_labels) == [
        head + rejected["content"] + end
    ]
    chat_prompt = prompt_ids(tokenizer, prompt)
    assert example.prompt_ids == chat_prompt
    assert example.rejected_ids[: len(chat_prompt)] == chat_prompt


# ----------------------------------------------------------------------------------------------------------
# The cases issue #19 names, one by one


def runs_of(tokenizer, messages, **kwargs) -> list[str]:
    rendered = render_conversation(tokenizer, messages, **kwargs)
    return trained_runs(tokenizer, rendered.input_ids, rendered.labels)


def test_qwen3_trains_every_turn_as_the_conversation_shows_it():
    tokenizer = family_tokenizer("qwen3")
    thought = "<think>\nAdd them.\n</think>\n\n"
    messages = [
        user(Q1),
        assistant(thought + A1),
        user(Q2),
        assistant("<think>\nDouble 4.\n</think>\n\n" + A2),
    ]
    rendered = render_conversation(tokenizer, messages)
    # The earlier turn lost its reasoning in the conversation, so it is trained without it; the last keeps it.
    assert "Add them." not in rendered.text
    runs = trained_runs(tokenizer, rendered.input_ids, rendered.labels)
    assert runs == [A1 + "<|im_end|>", "<think>\nDouble 4.\n</think>\n\n" + A2 + "<|im_end|>"]
    assert rendered.turns_unmasked == 0


def test_qwen3_reasoning_content_field_is_trained_in_the_last_turn():
    tokenizer = family_tokenizer("qwen3")
    messages = [user(Q1), {"role": "assistant", "content": A1, "reasoning_content": "Add them."}]
    assert runs_of(tokenizer, messages) == ["<think>\nAdd them.\n</think>\n\n" + A1 + "<|im_end|>"]


def test_deepseek_r1_prompt_ends_in_think_and_the_reasoning_follows_it():
    tokenizer = family_tokenizer("deepseek-r1-distill")
    messages = [user(Q1), assistant("<think>\nAdd them.\n</think>\n\n" + A1)]
    rendered = render_conversation(tokenizer, messages)
    start = last_reply_start(rendered.labels)
    # Prompted exactly as at inference (the prompt opens <think>), trained on what follows it in the data.
    assert rendered.input_ids[:start] == prompt_ids(tokenizer, messages[:1])
    assert tokenizer.decode(rendered.input_ids[:start]).endswith("<｜Assistant｜><think>\n")
    runs = trained_runs(tokenizer, rendered.input_ids, rendered.labels)
    assert runs == ["Add them.\n</think>\n\n" + A1 + "<｜end▁of▁sentence｜>"]


def test_phi35_trains_every_turn_closes_on_end_and_never_trains_endoftext_or_the_header():
    tokenizer = family_tokenizer("phi3.5")
    messages = [user(Q1), assistant(A1), user(Q2), assistant(" " + A2)]
    rendered = render_conversation(tokenizer, messages)
    assert rendered.text.endswith("<|end|>\n<|endoftext|>")
    runs = trained_runs(tokenizer, rendered.input_ids, rendered.labels)
    # The reply that starts with a space trains that space, not the <|assistant|> header that swallows it
    # when the whole text is tokenized at once.
    assert runs == [A1 + "<|end|>", " " + A2 + "<|end|>"]
    assert tokenizer.convert_tokens_to_ids("<|end|>") in end_of_turn_ids(tokenizer)
    # Rows and chat prompts both start with the BOS this tokenizer adds.
    assert rendered.input_ids[0] == tokenizer.bos_token_id
    assert prompt_ids(tokenizer, messages[:1])[0] == tokenizer.bos_token_id


def test_mistral_reply_starting_with_a_bracket_trains_no_part_of_the_instruction_marker():
    tokenizer = family_tokenizer("mistral-v0.1")
    assert "]<" in tokenizer.convert_ids_to_tokens(tokenizer("[/INST]<b>")["input_ids"])  # the merge exists
    messages = [user(Q1), assistant("<b>5</b>")]
    assert runs_of(tokenizer, messages) == ["<b>5</b></s>"]


@pytest.mark.parametrize("family", ["mistral-v0.1", "mistral-v0.2", "gemma2"])
def test_a_system_turn_the_template_refuses_is_named_as_such(family):
    tokenizer = family_tokenizer(family)
    rows = [Row(WHERE, {"messages": [{"role": "system", "content": SYSTEM}, user(Q1), assistant(A1)]})]
    with pytest.raises(UserError) as caught:
        prepare_sft(rows, "messages", tokenizer, 4096, "drop", "data.jsonl")
    message = str(caught.value)
    assert message.startswith(f"{WHERE}: turn 0 (system): this model's chat template accepts no system turn")
    assert "alternate" not in message.split("(the template says")[0]


def test_a_template_that_hides_tool_calls_is_refused_by_turn():
    tokenizer = family_tokenizer("phi3.5")
    messages = [user("Weather?"), {"role": "assistant", "content": None, "tool_calls": [CALL]}]
    with pytest.raises(
        UserError, match=r"turn 1 \(assistant\): this model's chat template does not show tool"
    ):
        render_conversation(tokenizer, messages)


@pytest.mark.parametrize("family", ["qwen2.5", "llama3.1"])
def test_tool_results_are_rendered_but_never_trained(family):
    tokenizer = family_tokenizer(family)
    data, _ = SFT_ROWS["openai tools"]
    rendered = render_conversation(tokenizer, to_conversation(Row(WHERE, data), "messages").messages)
    assert RESULT in rendered.text
    assert all(RESULT not in run for run in trained_runs(tokenizer, rendered.input_ids, rendered.labels))


def test_llama31_chat_stops_on_eot_and_generation_config_eos():
    from types import SimpleNamespace

    from qalign.chat import ChatSession

    class Model:
        generation_config = SimpleNamespace(eos_token_id=(7, 8))

        def eval(self):
            return self

    tokenizer = family_tokenizer("llama3.1")
    session = ChatSession(Model(), tokenizer, 0.0, 1.0, 4, None)
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") in session.stop_ids
    assert {7, 8} <= set(session.stop_ids)


def test_deepseek_r1_replies_without_reasoning_are_trained_after_the_open_think_and_reported():
    tokenizer = family_tokenizer("deepseek-r1-distill")
    rows = [Row(WHERE, {"messages": [user(Q1), assistant(A1)]})]
    (example,), report = prepare_sft(rows, "messages", tokenizer, 4096, "drop", "data.jsonl")
    start = last_reply_start(example.labels)
    assert tokenizer.decode(example.input_ids[:start]).endswith("<think>\n")
    assert trained_runs(tokenizer, example.input_ids, example.labels) == [A1 + "<｜end▁of▁sentence｜>"]
    assert report.unanswered_opening == 1
    assert any("learns to answer inside it" in w for w in report.warnings("sft"))
    with_reasoning = [user(Q1), assistant("<think>\nAdd.\n</think>\n\n" + A1)]
    assert not render_conversation(tokenizer, with_reasoning).unanswered_opening
