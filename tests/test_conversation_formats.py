"""The formats issue #19 adds: tool turns (OpenAI and ShareGPT), a top-level ShareGPT system, TRL's
conversational prompt/completion and explicit preference layouts; and how bad rows of them are named."""

from __future__ import annotations

import json

import pytest

from qalign.data import Row, to_conversation, to_messages
from qalign.dpo import split_preference
from qalign.errors import UserError

WHERE = "d.jsonl:4"
CALL = {"id": "call00001", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}}


def row(data: dict) -> Row:
    return Row(WHERE, data)


def test_a_top_level_sharegpt_system_becomes_the_system_turn():
    data = {
        "system": "Be brief.",
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}],
    }
    assert to_messages(row(data), "sharegpt") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"},
    ]


def test_a_sharegpt_system_field_and_system_turn_together_are_an_error():
    data = {
        "system": "Be brief.",
        "conversations": [{"from": "system", "value": "Be long."}, {"from": "human", "value": "Hi"},
                          {"from": "gpt", "value": "Yo"}],
    }  # fmt: skip
    with pytest.raises(UserError, match=r"^d\.jsonl:4: a 'system' field and a system turn"):
        to_messages(row(data), "sharegpt")


def test_sharegpt_function_call_and_observation_are_a_tool_call_and_its_result():
    data = {
        "conversations": [
            {"from": "human", "value": "Find x"},
            {"from": "function_call", "value": json.dumps({"name": "lookup", "arguments": {"q": "x"}})},
            {"from": "observation", "value": "found"},
            {"from": "gpt", "value": "It is found."},
        ]
    }
    messages = to_messages(row(data), "sharegpt")
    (call,) = messages[1]["tool_calls"]
    assert messages[1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"type": "function", "function": {"name": "lookup", "arguments": {"q": "x"}}, "id": call["id"]}
        ],
    }
    # ShareGPT has no call ids: each call gets one, and the observation answering it carries it.
    assert messages[2] == {"role": "tool", "content": "found", "tool_call_id": call["id"]}


def test_sharegpt_call_ids_are_nine_alphanumerics_the_same_on_every_run_and_distinct_per_call():
    calls = [{"name": "lookup", "arguments": {"q": "x"}}, {"name": "lookup", "arguments": {"q": "y"}}]
    data = {
        "conversations": [
            {"from": "human", "value": "Find x and y"},
            {"from": "function_call", "value": json.dumps(calls)},
            {"from": "observation", "value": "found x"},
            {"from": "observation", "value": "found y"},
            {"from": "gpt", "value": "Both found."},
        ]
    }
    messages = to_messages(row(data), "sharegpt")
    ids = [call["id"] for call in messages[1]["tool_calls"]]
    assert all(len(i) == 9 and i.isalnum() and i.isascii() for i in ids) and len(set(ids)) == 2
    assert [m["tool_call_id"] for m in messages[2:4]] == ids  # results answer the calls in order
    assert to_messages(row(data), "sharegpt") == messages  # deterministic
    other = [call["id"] for call in to_messages(Row("d.jsonl:5", data), "sharegpt")[1]["tool_calls"]]
    assert set(other).isdisjoint(ids)  # another row, other ids
    # An id the data gives is kept.
    given = [{**calls[0], "id": "abcdefghi"}, calls[1]]
    data["conversations"][1]["value"] = json.dumps(given)
    assert to_messages(row(data), "sharegpt")[2]["tool_call_id"] == "abcdefghi"


def test_sharegpt_function_calls_train_on_mistral_v03_which_demands_call_ids():
    from template_zoo import family_tokenizer

    from qalign.sft import prepare_sft

    data = {
        "conversations": [
            {"from": "human", "value": "Find x"},
            {"from": "function_call", "value": json.dumps({"name": "lookup", "arguments": {"q": "x"}})},
            {"from": "observation", "value": "found"},
            {"from": "gpt", "value": "It is found."},
        ]
    }
    tokenizer = family_tokenizer("mistral-v0.3")
    (example,), _ = prepare_sft([row(data)], "sharegpt", tokenizer, 512, "drop", "d.jsonl")
    call_id = to_messages(row(data), "sharegpt")[1]["tool_calls"][0]["id"]
    text = tokenizer.decode(example.input_ids)
    assert f'"id": "{call_id}"' in text and f'"call_id": "{call_id}"' in text


def test_a_sharegpt_function_call_that_is_not_json_names_its_row():
    data = {
        "conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "lookup(x)"}]
    }
    with pytest.raises(UserError, match=r"^d\.jsonl:4: conversations\[1\]\.value is not JSON"):
        to_messages(row(data), "sharegpt")


def test_openai_tool_turns_keep_their_ids_and_calls():
    data = {
        "messages": [
            {"role": "user", "content": "Find x"},
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call00001", "content": "found"},
            {"role": "assistant", "content": "It is found."},
        ]
    }
    messages = to_messages(row(data), "messages")
    assert messages[1]["tool_calls"] == [CALL] and messages[1]["content"] is None
    assert messages[2] == {"role": "tool", "tool_call_id": "call00001", "content": "found"}


@pytest.mark.parametrize(
    ("turns", "expected"),
    [
        ([{"role": "user", "content": "a"}, {"role": "tool", "content": "r"}], "turn 1 is 'tool' but 'assistant'"),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "tool", "content": "r"}],
            "turn 2 is 'tool' but 'user' was expected",
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": None, "tool_calls": [CALL]},
             {"role": "user", "content": "c"}],
            "turn 2 is 'user' but 'tool' was expected",
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [{"function": {"arguments": 1}}]}],
            "messages[1].tool_calls[0] must be an object with 'function'",
        ),
    ],
)  # fmt: skip
def test_tool_turns_out_of_place_name_the_turn(turns, expected):
    with pytest.raises(UserError) as caught:
        to_messages(row({"messages": turns}), "messages")
    assert str(caught.value).startswith(f"{WHERE}: ") and expected in str(caught.value)


def test_conversational_prompt_completion_trains_the_completion_only():
    data = {
        "prompt": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Sum 2 and 2"},
        ],
        "completion": [{"role": "assistant", "content": "4"}],
    }
    conversation = to_conversation(row(data), "prompt_completion")
    assert [m["role"] for m in conversation.messages] == ["user", "assistant", "user", "assistant"]
    assert conversation.trained_from == 3


def test_a_completion_without_an_assistant_turn_is_an_error():
    data = {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "user", "content": "Hm"}]}
    with pytest.raises(UserError, match=r"^d\.jsonl:4: turn 1 is 'user'"):
        to_conversation(row(data), "prompt_completion")


def test_trl_explicit_preference_rows_are_read():
    data = {
        "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "assistant", "content": "Go away."}],
    }
    prompt, chosen, rejected = split_preference(row(data))
    assert [m["role"] for m in prompt] == ["system", "user"]
    assert chosen == {"role": "assistant", "content": "Hello!"}
    assert rejected == {"role": "assistant", "content": "Go away."}
    # A string prompt works the same way.
    prompt, _, _ = split_preference(row({**data, "prompt": "Hi"}))
    assert prompt == [{"role": "user", "content": "Hi"}]


def test_an_explicit_preference_side_of_several_turns_says_where_they_belong():
    data = {
        "prompt": "Hi",
        "chosen": [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "more"}],
        "rejected": [{"role": "assistant", "content": "No."}],
    }
    with pytest.raises(UserError, match=r"^d\.jsonl:4: 'chosen' must be one assistant turn .*'prompt'"):
        split_preference(row(data))


ONE = [{"role": "assistant", "content": "Hello!"}]
TWO_REPLIES = [
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "And?"},
    {"role": "assistant", "content": "That is all."},
]
TOOL_THEN_REPLY = [
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call00001", "content": "found"},
    {"role": "assistant", "content": "It is found."},
]


@pytest.mark.parametrize(
    ("chosen", "rejected", "side", "roles"),
    [
        (TWO_REPLIES, ONE, "chosen", "assistant, user, assistant"),
        (ONE, TWO_REPLIES, "rejected", "assistant, user, assistant"),
        (TOOL_THEN_REPLY, ONE, "chosen", "assistant with tool_calls, tool, assistant"),
    ],
)
def test_explicit_preference_sides_with_several_assistant_turns_are_refused_by_row_and_side(
    chosen, rejected, side, roles
):
    """DPO compares one final reply per side, so a side with more than one assistant turn is an error naming
    the row, the side and its turns (issue #19's rule: prompt, chosen and rejected spans as SFT's; a side of
    several replies has no one span to score). prepare_dpo, the path a run takes, stops on it too."""
    from template_zoo import family_tokenizer

    from qalign.dpo import prepare_dpo

    data = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": chosen, "rejected": rejected}
    message = rf"^d\.jsonl:4: '{side}' must be one assistant turn \(got 3 turns: {roles}\); .*'prompt'"
    with pytest.raises(UserError, match=message):
        split_preference(row(data))
    with pytest.raises(UserError, match=message):
        prepare_dpo([row(data)], family_tokenizer("qwen2.5"), 512, "drop", "d.jsonl")


def test_whole_conversation_pairs_that_differ_by_more_than_one_final_reply_are_refused_by_row():
    shared = [{"role": "user", "content": "Hi"}]
    data = {
        "chosen": [*shared, *TWO_REPLIES],
        "rejected": [
            *shared,
            *ONE,
            {"role": "user", "content": "And?"},
            {"role": "assistant", "content": "Nothing."},
        ],
    }
    # The implicit layout takes the shared turns as the prompt: here they run up to the last reply, so it works.
    prompt, chosen, rejected = split_preference(row(data))
    assert len(prompt) == 3 and chosen["content"] == "That is all." and rejected["content"] == "Nothing."
    data["rejected"] = [
        *shared,
        {"role": "assistant", "content": "Bye."},
        {"role": "user", "content": "And?"},
        {"role": "assistant", "content": "Nothing."},
    ]
    with pytest.raises(
        UserError,
        match=r"^d\.jsonl:4: chosen and rejected must be the same conversation up to one "
        r"final assistant turn",
    ):
        split_preference(row(data))


def test_row_tools_are_read_in_the_openai_layout_bare_or_as_a_json_string():
    tool = {
        "name": "lookup",
        "description": "Look it up.",
        "parameters": {"type": "object", "properties": {}},
    }
    wrapped = {"type": "function", "function": tool}
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    assert to_conversation(row({"messages": turns, "tools": [wrapped]}), "messages").tools == [wrapped]
    assert to_conversation(row({"messages": turns, "tools": [tool]}), "messages").tools == [wrapped]
    sharegpt = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}
    assert to_conversation(row({**sharegpt, "tools": json.dumps([tool])}), "sharegpt").tools == [wrapped]
    assert to_conversation(row({"messages": turns}), "messages").tools is None
    with pytest.raises(UserError, match=r"^d\.jsonl:4: tools\[0\] must be"):
        to_conversation(row({"messages": turns, "tools": ["lookup"]}), "messages")
    with pytest.raises(UserError, match=r"^d\.jsonl:4: 'tools' is a string but not JSON"):
        to_conversation(row({"messages": turns, "tools": "lookup"}), "messages")


def test_gemma_refuses_tool_turns_by_turn_and_file_line():
    from template_zoo import family_tokenizer

    from qalign.sft import prepare_sft

    data = {
        "messages": [
            {"role": "user", "content": "Find x"},
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call00001", "content": "found"},
            {"role": "assistant", "content": "It is found."},
        ]
    }
    with pytest.raises(UserError) as caught:
        prepare_sft([row(data)], "messages", family_tokenizer("gemma2"), 512, "drop", "d.jsonl")
    message = str(caught.value)
    assert message.startswith(f"{WHERE}: turn 2 (tool): this model's chat template does not take tool")
    assert "(the template says: Conversation roles must alternate" in message
