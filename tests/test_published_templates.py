"""Vendors' published chat templates x every data format: the trained tokens, decoded turn by turn, are
exactly each assistant reply as the rendered conversation shows it plus the token(s) that close the turn;
every reply's prompt is the very token sequence `qalign chat` sends for its history; refusals name the row
and the turn.

ok: trains as above; R: refused, with the row, the turn and why (tested). Columns (`SFT_ROWS`, `DPO_ROWS`):
msg messages, sys messages with a system turn, multi multi-turn, sgpt ShareGPT with "system", alp Alpaca,
p/c prompt/completion, conv TRL's conversational p/c, tool OpenAI tool calls, fcall ShareGPT function_call,
dpo prompt/chosen/rejected strings, expl TRL's explicit layout, impl two whole conversations. tools=: the
template renders a row's "tools" (else they are counted and warned about). apart: when a multi-turn row's
earlier turns are trained in rows of their own, to be prompted exactly (`expected_apart`; r1: always;
sys/tools: with a system turn or tools; <: an earlier reply starting with "<"; sp: with a space).

| template               | msg | sys | multi | sgpt | alp | p/c | conv | tool | fcall | dpo | expl | impl | tools= | apart     |
| ---                    | --- | --- | ---   | ---  | --- | --- | ---  | ---  | ---   | --- | ---  | ---  | ---    | ---       |
| qwen2.5                | ok  | ok  | ok    | ok   | ok  | ok  | ok   | ok   | ok    | ok  | ok   | ok   | yes    | -         |
| qwen3                  | ok  | ok  | ok    | ok   | ok  | ok  | ok   | ok   | ok    | ok  | ok   | ok   | yes    | -         |
| deepseek-r1-distill    | ok  | ok  | ok    | ok   | ok  | ok  | ok   | ok   | ok    | ok  | ok   | ok   | no     | r1        |
| deepseek-r1-distill-v1 | ok  | ok  | ok    | ok   | ok  | ok  | ok   | R    | R     | ok  | ok   | ok   | no     | -         |
| llama3.1               | ok  | ok  | ok    | ok   | ok  | ok  | ok   | ok   | ok    | ok  | ok   | ok   | yes    | -         |
| llama3.2               | ok  | ok  | ok    | ok   | ok  | ok  | ok   | ok   | ok    | ok  | ok   | ok   | yes    | -         |
| gemma2                 | ok  | R   | ok    | R    | ok  | ok  | ok   | R    | R     | ok  | R    | ok   | no     | -         |
| gemma3                 | ok  | ok  | ok    | ok   | ok  | ok  | ok   | R    | R     | ok  | ok   | ok   | no     | -         |
| mistral-v0.1           | ok  | R   | ok    | R    | ok  | ok  | ok   | R    | R     | ok  | R    | ok   | no     | <         |
| mistral-v0.2           | ok  | R   | ok    | R    | ok  | ok  | ok   | R    | R     | ok  | R    | ok   | no     | <         |
| mistral-v0.3           | ok  | ok  | ok    | ok   | ok  | ok  | ok   | ok   | ok    | ok  | ok   | ok   | yes    | sys/tools |
| phi3.5                 | ok  | ok  | ok    | ok   | ok  | ok  | ok   | R    | R     | ok  | ok   | ok   | no     | sp        |
| phi4-mini              | ok  | ok  | ok    | ok   | ok  | ok  | ok   | R    | R     | ok  | ok   | ok   | no     | -         |
| smollm2                | ok  | ok  | ok    | ok   | ok  | ok  | ok   | R    | R     | ok  | ok   | ok   | no     | -         |
| olmo2                  | ok  | ok  | ok    | ok   | ok  | ok  | ok   | R    | R     | ok  | ok   | ok   | no     | -         |
"""

from __future__ import annotations

import json

import pytest
from template_zoo import FAMILIES, family_tokenizer

from qalign.chat_template import IGNORE, end_of_turn_ids, prompt_ids, render_conversation, render_rows
from qalign.data import Row, to_conversation
from qalign.dpo import prepare_dpo, split_preference
from qalign.errors import UserError
from qalign.sft import prepare_sft
from qalign.template_text import render_spelled

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


def rendered_rows(tokenizer, conversation):
    return render_rows(tokenizer, conversation.messages, conversation.trained_from, conversation.tools)


def trained_by_turn(tokenizer, conversation) -> dict[int, tuple[str, bool]]:
    """Each trained assistant turn (message index): its trained text, and whether it is the final turn of the
    row it is trained in. Every turn is trained once, in one row."""
    out: dict[int, tuple[str, bool]] = {}
    rows = rendered_rows(tokenizer, conversation)
    for k, rendered in enumerate(rows):
        last = len(conversation.messages) - 1 if k == 0 else rows[0].apart[k - 1]
        runs = trained_runs(tokenizer, rendered.input_ids, rendered.labels)
        assert len(runs) == len(rendered.turns), (runs, rendered.turns)
        for turn, run in zip(rendered.turns, runs, strict=True):
            assert turn not in out, f"turn {turn} trained twice"
            out[turn] = (run, turn == last)
    return out


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
    end = FAMILIES[family].end_of_turn
    conversation = to_conversation(rows[0], FORMAT_OF[fmt])
    assistants = [j for j, m in enumerate(conversation.messages) if m["role"] == "assistant"]
    trained = trained_by_turn(tokenizer, conversation)
    assert [(e.input_ids, e.labels) for e in examples] == [
        (r.input_ids, r.labels) for r in rendered_rows(tokenizer, conversation)
    ]
    assert report.turns_unmasked == 0 and report.inexact_prompts == 0
    assert report.turns_apart == len(examples) - 1
    assert sorted(trained) == assistants[-len(replies) :], (trained, assistants)
    for turn, reply in zip(assistants[-len(replies) :], replies, strict=True):
        run, final = trained[turn]
        want = prefix(family, final) + reply + end
        if want.endswith("<call>" + end):
            check_tool_call_run(run, end)
        else:
            assert run == want
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
# Train as you infer, turn by turn


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
SYSTEM_TURN = {"role": "system", "content": SYSTEM}
TOOL_CALL_TURNS = [
    user("Weather in Paris?"),
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call00001", "content": RESULT},
    assistant(AFTER_TOOL),
]
# Multi-turn rows, each as (row, format); the odd starts are the merges issue #19 names: "<" after Mistral's
# "[/INST]" (the token "]<"), a space after Phi's "<|assistant|>" (which swallows it).
MULTI_TURN_ROWS = {
    "multi-turn": (SFT_ROWS["multi-turn"][0], "messages"),
    "multi-turn+system": ({"messages": [SYSTEM_TURN, user(Q1), assistant(A1), user(Q2), assistant(A2)]}, "messages"),
    "replies starting with '<' and ' '": (
        {"messages": [user(Q1), assistant("<b>5</b>"), user(Q2), assistant(" It is 8."), user("And 1 + 1?"),
                      assistant("<i>2</i>")]},
        "messages",
    ),
    "earlier reasoning": (
        {"messages": [user(Q1), assistant("<think>\nAdd.\n</think>\n\n" + A1), user(Q2), assistant(A2)]},
        "messages",
    ),
    "sharegpt+system": (SFT_ROWS["sharegpt+system"][0], "sharegpt"),
    "conversational prompt_completion": (SFT_ROWS["conversational prompt_completion"][0], "prompt_completion"),
    "tools defined": ({"tools": [WEATHER_TOOL], "messages": [user(Q1), assistant(A1), user(Q2), assistant(A2)]},
                      "messages"),
    "tool calls, tools defined, then a turn": (
        {"tools": [WEATHER_TOOL], "messages": [*TOOL_CALL_TURNS, user(Q2), assistant(A2)]}, "messages",
    ),
    "sharegpt function_call, then a turn": (
        {"conversations": [*SFT_ROWS["sharegpt function_call"][0]["conversations"], {"from": "human", "value": Q2},
                           {"from": "gpt", "value": A2}]},
        "sharegpt",
    ),
}  # fmt: skip
MULTI_WITH_SYSTEM = {"multi-turn+system", "sharegpt+system"}
MULTI_WITH_TOOL_CALLS = {"tool calls, tools defined, then a turn", "sharegpt function_call, then a turn"}


def chat_tokens(tokenizer, family: str, messages: list[dict], tools: list[dict] | None) -> list[int]:
    """`tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True)`, which
    tokenizes without the tokenizer's own special tokens. `qalign chat` and training rows differ from it in
    one stated way: where the tokenizer puts BOS in front of an ordinary encode and the template prints none
    (Phi-3.5), both start with that BOS, as the model was pretrained; so it is put in front here too."""
    ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True)
    ids = list(ids if isinstance(ids, list) else ids["input_ids"])
    if FAMILIES[family].adds_bos and ids[:1] != [tokenizer.bos_token_id]:
        ids = [tokenizer.bos_token_id, *ids]
    return ids


def expected_apart(family: str, fmt: str) -> bool:
    """Whether some earlier turn cannot be prompted as chat prompts it inside the whole conversation, and so
    is trained in a row of its own: DeepSeek-R1's prompt opens "<think>" that its history never shows; Mistral
    v0.3 shows the system turn and the tools only in the last user turn; Mistral v0.1/v0.2 merge "]<" and
    Phi-3.5's "<|assistant|>" swallows the reply's space once the history is tokenized whole."""
    if family == "deepseek-r1-distill":  # the current template; v1's prompt opens no "<think>"
        return fmt != "conversational prompt_completion"  # its earlier turns are a prompt, not trained
    if family == "mistral-v0.3":
        return fmt in MULTI_WITH_SYSTEM or "tools defined" in fmt
    if family in ("mistral-v0.1", "mistral-v0.2"):  # an earlier reply starts with "<" ("<b>", "<think>")
        return fmt in ("replies starting with '<' and ' '", "earlier reasoning")
    if family == "phi3.5":  # an earlier reply starts with a space
        return fmt == "replies starting with '<' and ' '"
    return False


@pytest.mark.parametrize("fmt", list(MULTI_TURN_ROWS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_reply_is_trained_right_after_exactly_the_tokens_chat_prompts_it_with(family, fmt):
    """For every assistant turn k of a multi-turn row, the tokens before its first trained token are
    `apply_chat_template(messages[:k], add_generation_prompt=True, tokenize=True)` (with the BOS rule of
    `chat_tokens`), in whichever row trains it, and every turn is trained once. No template is excepted: an
    earlier turn the whole conversation cannot prompt so is trained in a row of its own (`expected_apart`).
    What the rule does not promise: that an earlier turn is trained as the model would write it when the
    template rewrites history (Qwen3 drops an earlier turn's reasoning: that turn is trained without it)."""
    tokenizer = family_tokenizer(family)
    data, data_format = MULTI_TURN_ROWS[fmt]
    row = Row(WHERE, data)
    spec = FAMILIES[family]
    if (fmt in MULTI_WITH_SYSTEM and not spec.system) or (fmt in MULTI_WITH_TOOL_CALLS and not spec.tools):
        with pytest.raises(UserError, match=r"turn \d+ \((system|assistant|tool)\)"):
            prepare_sft([row], data_format, tokenizer, 4096, "drop", "data.jsonl")
        return
    conversation = to_conversation(row, data_format)
    spelled, _ = render_spelled(tokenizer, conversation.messages, conversation.tools)
    rows = rendered_rows(tokenizer, conversation)
    trained = []
    for rendered in rows:
        assert not rendered.inexact_prompt and rendered.turns_unmasked == 0
        starts = reply_starts(rendered.labels)
        assert len(starts) == len(rendered.turns)
        for turn, start in zip(rendered.turns, starts, strict=True):
            want = chat_tokens(tokenizer, family, spelled[:turn], conversation.tools)
            assert rendered.input_ids[:start] == want, (
                turn,
                tokenizer.convert_ids_to_tokens(rendered.input_ids[:start])[-6:],
                tokenizer.convert_ids_to_tokens(want)[-6:],
            )
            trained.append(turn)
    assistants = [
        j
        for j, m in enumerate(conversation.messages)
        if m["role"] == "assistant" and j >= conversation.trained_from
    ]
    assert sorted(trained) == assistants
    assert (len(rows) > 1) == expected_apart(family, fmt), [r.turns for r in rows]


# The templates that render a `tools=` list; the others ignore it, which is counted and warned about.
RENDERS_TOOLS = {"qwen2.5", "qwen3", "llama3.1", "llama3.2", "mistral-v0.3"}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_rows_tools_reach_the_template_or_are_reported(family):
    tokenizer = family_tokenizer(family)
    messages = [user(Q1), assistant(A1)]
    data = {"tools": [WEATHER_TOOL], "messages": messages}
    (example,), report = prepare_sft([Row(WHERE, data)], "messages", tokenizer, 4096, "drop", "data.jsonl")
    shown = WEATHER_TOOL["function"]["description"] in tokenizer.decode(example.input_ids)
    assert shown == (family in RENDERS_TOOLS)
    assert report.tools_ignored == (family not in RENDERS_TOOLS)
    assert any("does not render" in w for w in report.warnings("sft")) == (family not in RENDERS_TOOLS)
    # The reply's prompt is chat's prompt given the same tools.
    start = last_reply_start(example.labels)
    assert example.input_ids[:start] == chat_tokens(tokenizer, family, messages[:1], [WEATHER_TOOL])


@pytest.mark.parametrize("family", ["qwen2.5", "gemma3"])
def test_a_preference_rows_tools_reach_both_sides_or_are_reported(family):
    tokenizer = family_tokenizer(family)
    data = {"tools": [WEATHER_TOOL], "prompt": Q1, "chosen": A1, "rejected": "It is 6."}
    (example,), report = prepare_dpo([Row(WHERE, data)], tokenizer, 4096, "drop", "pairs.jsonl")
    assert example.prompt_ids == chat_tokens(tokenizer, family, [user(Q1)], [WEATHER_TOOL])
    assert report.tools_ignored == (family not in RENDERS_TOOLS)


def test_chat_tools_file_is_read_as_a_rows_tools(tmp_path):
    from qalign.chat import read_tools

    path = tmp_path / "tools.json"
    path.write_text(json.dumps([WEATHER_TOOL["function"]]), encoding="utf-8")
    assert read_tools(path) == [WEATHER_TOOL]  # a bare schema is wrapped, as in rows
    path.write_text("[{", encoding="utf-8")
    with pytest.raises(UserError, match=r"^--tools .*tools\.json:1: invalid JSON"):
        read_tools(path)
    with pytest.raises(UserError, match=r"^--tools .*missing\.json: cannot read it"):
        read_tools(tmp_path / "missing.json")


def test_chat_gives_the_template_its_tools():
    from types import SimpleNamespace

    from qalign.chat import ChatSession

    class Model:
        generation_config = SimpleNamespace(eos_token_id=None)

        def eval(self):
            return self

    tokenizer = family_tokenizer("qwen2.5")
    session = ChatSession(Model(), tokenizer, 0.0, 1.0, 4, None, tools=[WEATHER_TOOL])
    messages = [user(Q1)]
    assert prompt_ids(tokenizer, messages, session.tools) == chat_tokens(
        tokenizer, "qwen2.5", messages, [WEATHER_TOOL]
    )
    assert "get_weather" in tokenizer.decode(prompt_ids(tokenizer, messages, session.tools))


APART_CODES = {"deepseek-r1-distill": "r1", "mistral-v0.3": "sys/tools", "mistral-v0.1": "<",
               "mistral-v0.2": "<", "phi3.5": "sp"}  # fmt: skip


def outcome_table() -> str:
    """The table in this module's docstring, from what the tests above expect."""
    head = ["template", "msg", "sys", "multi", "sgpt", "alp", "p/c", "conv", "tool", "fcall", "dpo", "expl",
            "impl", "tools=", "apart"]  # fmt: skip
    rows = [head, ["---"] * len(head)]
    for family in FAMILIES:
        cells = ["ok" if expected_outcome(family, fmt) is None else "R" for fmt in [*SFT_ROWS, *DPO_ROWS]]
        apart = any(expected_apart(family, fmt) for fmt in MULTI_TURN_ROWS)
        tools = "yes" if family in RENDERS_TOOLS else "no"
        rows.append([family, *cells, tools, APART_CODES[family] if apart else "-"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join(
        "| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) + " |"
        for row in rows
    )


def test_the_table_in_the_docstring_is_what_the_tests_expect():
    assert outcome_table() in __doc__


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
