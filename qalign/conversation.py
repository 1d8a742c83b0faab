"""One data row as a conversation: every format (messages, ShareGPT, Alpaca, prompt/completion) becomes
OpenAI-style messages, checked turn by turn, with where training starts."""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qalign.errors import UserError

if TYPE_CHECKING:
    from qalign.data import Row

ROLES = ("system", "user", "assistant", "tool")
# OpenAI's legacy function calling: a "function" turn is a tool result (its "name" kept), answering an
# assistant turn's single "function_call".
ROLE_ALIASES = {"function": "tool"}
SHAREGPT_ROLES = {
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
}
# The keys that identify each format in `format: auto`, in the order they are tried.


@dataclass
class Conversation:
    messages: list[dict]
    trained_from: int = 0
    """Assistant turns before this index are context (a prompt given as messages), not trained."""
    tools: list[dict] | None = None
    """The row's function definitions (OpenAI layout), passed to the chat template as `tools=`."""


def to_messages(row: Row, fmt: str, require_reply: bool = True) -> list[dict]:
    """One row as a validated conversation: optional system turn, then user/assistant turns alternating
    (tool results after an assistant turn that calls tools), with at least one assistant turn (unless
    `require_reply` is off, for preference prompts)."""
    return to_conversation(row, fmt, require_reply).messages


def to_conversation(row: Row, fmt: str, require_reply: bool = True) -> Conversation:
    """to_messages, and where training starts: a conversational prompt/completion row trains its completion
    only."""
    data, where = row.data, row.where
    trained_from = 0
    if fmt == "messages":
        messages = parse_messages(_require(data, "messages", list, where), where, "messages")
    elif fmt == "sharegpt":
        messages = _sharegpt(data, where)
    elif fmt == "alpaca":
        instruction = _require(data, "instruction", str, where)
        extra = data.get("input")
        if extra is not None and not isinstance(extra, str):
            raise UserError(f"{where}: 'input' must be a string, got {type(extra).__name__}")
        prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        messages = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _require(data, "output", str, where)},
        ]
        system = data.get("system")
        if isinstance(system, str) and system.strip():
            messages.insert(0, {"role": "system", "content": system})
    elif fmt == "prompt_completion":
        prompt, completion = data.get("prompt"), data.get("completion")
        if isinstance(prompt, list) or isinstance(completion, list):
            # TRL's conversational layout: both sides are message lists; only the completion is trained.
            messages = _side(data, "prompt", "user", where)
            trained_from = len(messages)
            messages += _side(data, "completion", "assistant", where)
        else:
            messages = [
                {"role": "user", "content": _require(data, "prompt", str, where)},
                {"role": "assistant", "content": _require(data, "completion", str, where)},
            ]
    else:  # pragma: no cover - the schema restricts formats
        raise UserError(f"{where}: unknown data format '{fmt}'")
    check_turns(messages, where, require_reply)
    if require_reply and not any(m["role"] == "assistant" for m in messages[trained_from:]):
        raise UserError(f"{where}: the completion has no assistant turn: nothing to train on")
    return Conversation(messages, trained_from, parse_tools(data.get("tools"), where))


def parse_tools(tools: object, where: str) -> list[dict] | None:
    """A row's "tools": a list of function schemas, or that list as a JSON string (LLaMA-Factory's ShareGPT),
    each in the OpenAI layout ({"type": "function", "function": {...}}) or bare ({"name", ...}), which is
    wrapped so templates that read `tool.function` (Mistral v0.3) see it."""
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: 'tools' is a string but not JSON ({exc.msg})") from None
    if not isinstance(tools, list):
        raise UserError(
            f"{where}: 'tools' must be a list of function definitions, got {type(tools).__name__}"
        )
    out = []
    for j, tool in enumerate(tools):
        if isinstance(tool, dict) and isinstance(tool.get("function"), dict):
            out.append(tool)
        elif isinstance(tool, dict) and isinstance(tool.get("name"), str):
            out.append({"type": "function", "function": tool})
        else:
            raise UserError(
                f"{where}: tools[{j}] must be {{'type': 'function', 'function': {{'name', ...}}}}"
            )
    return out


def _side(data: dict, key: str, role: str, where: str) -> list[dict]:
    """One side of a prompt/completion row: a string (one `role` turn) or a list of messages."""
    value = data.get(key)
    if isinstance(value, list):
        return parse_messages(value, where, key)
    return [{"role": role, "content": _require(data, key, str, where)}]


def parse_messages(turns: list, where: str, key: str) -> list[dict]:
    """OpenAI-style messages: role and content, plus tool_calls on assistant turns and tool_call_id/name on
    tool turns, kept as given so templates that use them see them."""
    messages = []
    for i, turn in enumerate(turns):
        name = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise UserError(f"{where}: {name} must be an object with 'role' and 'content'")
        role = _require(turn, "role", str, where, f"{name}.role")
        role = ROLE_ALIASES.get(role, role)
        if role not in ROLES:
            known = ", ".join((*ROLES, *ROLE_ALIASES))
            raise UserError(f"{where}: {name}.role '{role}' is not one of {known}")
        message: dict = {"role": role}
        if role == "assistant" and turn.get("tool_calls"):
            message["content"] = _optional_text(turn, "content", where, f"{name}.content")
            message["tool_calls"] = _tool_calls(turn["tool_calls"], where, f"{name}.tool_calls")
        elif role == "assistant" and turn.get("function_call"):
            call = turn["function_call"]
            if isinstance(call, dict):  # the legacy call carries no id; pair it with its result by one
                call = {"id": call_id(where, i, 0), "function": call}
            message["content"] = _optional_text(turn, "content", where, f"{name}.content")
            message["tool_calls"] = _tool_calls([call], where, f"{name}.function_call")
        else:
            message["content"] = _require(turn, "content", str, where, f"{name}.content")
        if role == "assistant" and isinstance(turn.get("reasoning_content"), str):
            message["reasoning_content"] = turn["reasoning_content"]
        if role == "tool":
            for extra in ("tool_call_id", "name"):
                if isinstance(turn.get(extra), str):
                    message[extra] = turn[extra]
        messages.append(message)
    _answer_calls(messages)
    return messages


def _optional_text(data: dict, key: str, where: str, name: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise UserError(f"{where}: '{name}' must be a string or null, got {type(value).__name__}")
    return value


def _tool_calls(calls: object, where: str, name: str) -> list[dict]:
    """Tool calls in the OpenAI layout ({"type": "function", "function": {"name", "arguments"}})."""
    if not isinstance(calls, list):
        raise UserError(f"{where}: '{name}' must be a list, got {type(calls).__name__}")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise UserError(
                f"{where}: {name}[{j}] must be an object with 'function': {{'name', 'arguments'}}"
            )
        arguments = function.get("arguments", {})
        if not isinstance(arguments, (dict, str)):
            raise UserError(f"{where}: {name}[{j}].function.arguments must be an object or a JSON string")
        spelled = {
            "type": call.get("type", "function"),
            "function": {"name": function["name"], "arguments": arguments},
        }
        if isinstance(call.get("id"), str):
            spelled["id"] = call["id"]
        out.append(spelled)
    return out


def _sharegpt(data: dict, where: str) -> list[dict]:
    turns = _require(data, "conversations", list, where)
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise UserError(f"{where}: conversations[{i}] must be an object with 'from' and 'value'")
        speaker = _require(turn, "from", str, where, f"conversations[{i}].from")
        value = _require(turn, "value", str, where, f"conversations[{i}].value")
        role = SHAREGPT_ROLES.get(speaker.lower())
        if role is None:
            known = ", ".join(sorted(SHAREGPT_ROLES))
            raise UserError(f"{where}: conversations[{i}].from '{speaker}' is not one of {known}")
        if speaker.lower() == "function_call":
            messages.append(_sharegpt_call(value, where, f"conversations[{i}].value", i))
        else:
            messages.append({"role": role, "content": value})
    _answer_calls(messages)
    system = data.get("system")
    if system is not None and not isinstance(system, str):
        raise UserError(f"{where}: 'system' must be a string, got {type(system).__name__}")
    if system and system.strip():
        if messages and messages[0]["role"] == "system":
            raise UserError(f"{where}: a 'system' field and a system turn in 'conversations': keep one")
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _sharegpt_call(value: str, where: str, name: str, turn: int) -> dict:
    """A ShareGPT function_call turn: its value is the call as JSON ({"name", "arguments"}, or a list). ShareGPT
    carries no call ids; each call gets one (`call_id`), as templates that pair calls with results need."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{where}: {name} is not JSON ({exc.msg}); a function_call holds {{'name', 'arguments'}}"
        ) from None
    calls = parsed if isinstance(parsed, list) else [parsed]
    if not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        raise UserError(f"{where}: {name} must hold {{'name', 'arguments'}} (or a list of them)")
    spelled = [
        {
            "id": c["id"] if isinstance(c.get("id"), str) else call_id(where, turn, j),
            "function": {"name": c["name"], "arguments": c.get("arguments", {})},
        }
        for j, c in enumerate(calls)
    ]
    return {"role": "assistant", "content": None, "tool_calls": _tool_calls(spelled, where, name)}


ID_ALPHABET = string.ascii_letters + string.digits


def call_id(where: str, turn: int, call: int) -> str:
    """A tool call id for data that has none: 9 letters and digits (the form Mistral v0.3's template demands),
    the same for the same row, turn and call on every run, and unlike from call to call the way a model's own
    ids are (a counter would teach the model to write "call00001")."""
    digest = int.from_bytes(hashlib.sha256(f"{where}\0{turn}\0{call}".encode()).digest()[:8], "big")
    out = []
    for _ in range(9):
        digest, index = divmod(digest, len(ID_ALPHABET))
        out.append(ID_ALPHABET[index])
    return "".join(out)


def _answer_calls(messages: list[dict]) -> None:
    """Tool results answer the calls before them in order: one without an id (a ShareGPT observation, an
    OpenAI legacy function turn) takes its call's."""
    pending: list[dict] = []
    for message in messages:
        if message.get("tool_calls"):
            pending = list(message["tool_calls"])
        elif message["role"] == "tool" and pending:
            call = pending.pop(0)
            if "id" in call:
                message.setdefault("tool_call_id", call["id"])
        elif message["role"] != "tool":
            pending = []


def check_turns(messages: list[dict], where: str, require_reply: bool = True) -> None:
    """An optional system turn first, then user and assistant turns alternating; tool results only right after
    an assistant turn that calls tools (and the assistant turn follows them)."""
    if not messages:
        raise UserError(f"{where}: the conversation is empty")
    offset = 1 if messages[0]["role"] == "system" else 0
    expected = ("user",)
    for i, message in enumerate(messages[offset:], start=offset):
        role = message["role"]
        if role not in expected:
            wanted = " or ".join(f"'{e}'" for e in expected)
            raise UserError(
                f"{where}: turn {i} is '{role}' but {wanted} was expected "
                "(an optional system turn first, then user and assistant turns alternating; "
                "tool turns right after an assistant turn that calls tools)"
            )
        content = message.get("content")
        if not message.get("tool_calls") and not (content or "").strip():
            raise UserError(f"{where}: turn {i} ({role}) is empty")
        if role == "user":
            expected = ("assistant",)
        elif role == "assistant":
            expected = ("tool",) if message.get("tool_calls") else ("user",)
        else:
            expected = ("tool", "assistant")
    if require_reply and not any(m["role"] == "assistant" for m in messages[offset:]):
        raise UserError(f"{where}: no assistant turn: nothing to train on")


def _require(data: dict, key: str, kind: type, where: str, name: str | None = None) -> object:
    name = name or key
    if key not in data or data[key] is None:
        raise UserError(f"{where}: missing field '{name}'")
    value = data[key]
    if not isinstance(value, kind):
        raise UserError(f"{where}: '{name}' must be a {_kind_name(kind)}, got {type(value).__name__}")
    if kind is str and not value.strip() and key not in ("content", "value", "input"):
        raise UserError(f"{where}: '{name}' is empty")
    return value


def _kind_name(kind: type) -> str:
    return {str: "string", list: "list", dict: "object"}.get(kind, kind.__name__)
