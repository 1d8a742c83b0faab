"""The chat template's text for a conversation, and what the template says about it: how it closes an
assistant turn, and, when it refuses a conversation, which turn and why.

Published templates disagree on how tool calls are spelled (arguments as a JSON object or as a JSON string;
a tool-calling turn's content as null or as ""), so a conversation is rendered in the first spelling its
template accepts, and every later render of that conversation uses the same spelling.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from jinja2 import TemplateError, UndefinedError
from transformers import PreTrainedTokenizerBase

from qalign.errors import UserError, first_line

# Marks where a turn's content sits in a render; plain letters, so no template's trim or split touches it.
SENTINEL = "QALIGNSENTINELREPLY"
SENTINEL_USER = "QALIGNSENTINELUSER"
# What a template raises when it refuses a conversation: raise_exception is a TemplateError, and templates
# that concatenate a null content raise TypeError.
REFUSALS = (TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError)


def apply(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    add_generation_prompt: bool = False,
    tools: list[dict] | None = None,
) -> str:
    """The template's text, exceptions untouched (callers decide how to explain them). `tools` are the row's
    function definitions, passed as `tools=` the way inference passes them."""
    return tokenizer.apply_chat_template(
        messages, tools=tools or None, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def ignores_tools(tokenizer: PreTrainedTokenizerBase, messages: list[dict], tools: list[dict] | None) -> bool:
    """The row defines tools but the template's text is the same without them: the model never sees them."""
    if not tools:
        return False
    spelled, text = render_spelled(tokenizer, messages, tools)
    return text == apply(tokenizer, spelled)


def check_tools_shown(spelled: list[dict], text: str) -> None:
    """Every tool call's name and every tool result's text appear in the rendered conversation. Templates that
    know only system, user and assistant turns (Phi-3.5's, OLMo-2's) drop the others without a word, and a
    reply trained after a result the model never sees teaches it to make results up."""
    hint = "use a model whose template renders them, or set model.chat_template to one that does"
    for turn, message in enumerate(spelled):
        for call in message.get("tool_calls") or []:
            if call["function"]["name"] not in text:
                raise UserError(
                    f"turn {turn} (assistant): this model's chat template does not show tool calls ({hint})"
                )
        content = (message.get("content") or "").strip()
        if message["role"] == "tool" and content:
            # A template may write the result as a JSON string (escaped quotes and newlines).
            escaped = json.dumps(content, ensure_ascii=False)[1:-1]
            if content not in text and escaped not in text:
                raise UserError(
                    f"turn {turn} (tool): this model's chat template does not show tool results: the result "
                    f"is missing from the rendered conversation ({hint})"
                )


def spellings(messages: list[dict]) -> list[list[dict]]:
    """The conversation as each template family expects tool calls, most common first. Without tool calls
    there is one spelling: the messages as they are."""
    if not any(m.get("tool_calls") for m in messages):
        return [messages]
    # A null content first, in either arguments spelling: some templates take a tool-calling turn only when its
    # content is null, and an empty string would render as a second, empty reply.
    return [
        [_spell(m, arguments, empty) for m in messages]
        for empty in (None, "")
        for arguments in (_as_object, _as_string)
    ]


def _spell(message: dict, arguments: Callable[[object], object], empty: str | None) -> dict:
    if not message.get("tool_calls"):
        return message
    calls = [
        {**call, "function": {**call["function"], "arguments": arguments(call["function"]["arguments"])}}
        for call in message["tool_calls"]
    ]
    content = message.get("content")
    return {**message, "tool_calls": calls, "content": content if content else empty}


def _as_object(arguments: object) -> object:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def _as_string(arguments: object) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def render_spelled(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], tools: list[dict] | None = None
) -> tuple[list[dict], str]:
    """(the spelling the template accepts, its text for the whole conversation)."""
    first: BaseException | None = None
    options = spellings(messages)
    for spelled in options:
        try:
            return spelled, apply(tokenizer, spelled, tools=tools)
        except REFUSALS as exc:
            first = first or exc
    raise UserError(explain_refusal(tokenizer, options[0], first, tools))


def render_prompt_text(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], tools: list[dict] | None = None
) -> str:
    """The generation prompt for `messages`, exactly as `qalign chat` sends it."""
    first: BaseException | None = None
    options = spellings(messages)
    for spelled in options:
        try:
            return apply(tokenizer, spelled, add_generation_prompt=True, tools=tools)
        except REFUSALS as exc:
            first = first or exc
    raise UserError(explain_refusal(tokenizer, options[0], first, tools))


def prefix_prompt(
    tokenizer: PreTrainedTokenizerBase, spelled: list[dict], turn: int, tools: list[dict] | None = None
) -> str:
    """The generation prompt for the turns before `turn` (already in the spelling the template accepts)."""
    try:
        return apply(tokenizer, spelled[:turn], add_generation_prompt=True, tools=tools)
    except REFUSALS as exc:
        raise UserError(explain_refusal(tokenizer, spelled, exc, tools)) from None


def explain_refusal(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    exc: BaseException | None,
    tools: list[dict] | None = None,
) -> str:
    """Which turn the template refuses and why, in the terms of the data rather than of Jinja."""
    for turn in range(len(messages)):
        refused = _refusal(tokenizer, messages[: turn + 1], tools)
        if refused is not None:
            break
    else:
        return f"the chat template refused this conversation (the template says: {first_line(exc)})"
    message = messages[turn]
    role = message["role"]
    without_system = [m for m in messages if m["role"] != "system"]
    if role == "system" and _refusal(tokenizer, without_system, tools) is None:
        why = (
            "this model's chat template accepts no system turn "
            "(fold the instructions into the first user turn, or drop the system turn)"
        )
    elif role == "tool" or message.get("tool_calls"):
        why = "this model's chat template does not take tool calls or tool results in this form"
    else:
        why = "the chat template refused this turn"
    return f"turn {turn} ({role}): {why} (the template says: {first_line(refused)})"


def _refusal(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], tools: list[dict] | None = None
) -> BaseException | None:
    """None when some spelling of `messages` renders; else the most telling refusal: the template's own
    raise_exception message over an error from a spelling it cannot read."""
    if not messages:
        return None
    refusals = []
    for spelled in spellings(messages):
        try:
            apply(tokenizer, spelled, tools=tools)
            return None
        except REFUSALS as exc:
            refusals.append(exc)
    deliberate = [e for e in refusals if isinstance(e, TemplateError) and not isinstance(e, UndefinedError)]
    return (deliberate or refusals)[0]


def closing_text(
    tokenizer: PreTrainedTokenizerBase, spelled: list[dict], turn: int, tools: list[dict] | None = None
) -> str:
    """The text the template closes assistant turn `turn` with (e.g. "<|im_end|>", "<|end|>", "</s>"), without
    what it writes only at the very end of a conversation (Phi's <|endoftext|>) or between turns (newlines).

    Found by rendering the turn with a sentinel as its content, once as the last turn and once followed by a
    user turn: the closing is what both renders put right after the sentinel, cut at a token boundary."""
    probe = [*spelled[:turn], {"role": "assistant", "content": SENTINEL}]
    try:
        last = apply(tokenizer, probe, tools=tools)
    except REFUSALS:
        return ""
    if SENTINEL not in last:
        return ""
    after_last = last[last.index(SENTINEL) + len(SENTINEL) :]
    try:
        followed = apply(tokenizer, [*probe, {"role": "user", "content": SENTINEL_USER}], tools=tools)
    except REFUSALS:
        return after_last.rstrip()
    if SENTINEL not in followed:  # the template rewrites a turn once another follows
        return after_last.rstrip()
    after_followed = followed[followed.index(SENTINEL) + len(SENTINEL) :]
    return _common_token_prefix(tokenizer, after_last, after_followed).rstrip()


def _common_token_prefix(tokenizer: PreTrainedTokenizerBase, a: str, b: str) -> str:
    """The longest common prefix of two texts that ends on a token boundary of both."""
    ea = tokenizer(a, add_special_tokens=False, return_offsets_mapping=True)
    eb = tokenizer(b, add_special_tokens=False, return_offsets_mapping=True)
    end = 0
    for ta, tb, (_, hi) in zip(ea["input_ids"], eb["input_ids"], ea["offset_mapping"], strict=False):
        if ta != tb:
            break
        end = hi
    return a[:end]
