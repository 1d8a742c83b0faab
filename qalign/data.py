"""Reading and checking training data: files and hub datasets in, validated conversations out.

Every row is checked before any training starts, and every problem names its file and line. Local JSONL is
parsed here (not by `datasets`) so that line numbers are exact; parquet, CSV and hub ids go through
`datasets` and are named by row number.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from qalign.errors import UserError

ROLES = ("system", "user", "assistant", "tool")
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
FORMAT_KEYS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
}


@dataclass
class Row:
    where: str
    """file:line (or file:row N, or dataset:split row N) for messages."""
    data: dict


def read_rows(source: str, split: str = "train") -> list[Row]:
    """Every row of a local file or hub dataset, each tagged with where it came from."""
    path = Path(source)
    if path.exists():
        if path.is_dir():
            raise UserError(
                f"{path}: is a folder; point the recipe at a .jsonl, .json, .parquet or .csv file"
            )
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            rows = list(_read_jsonl(path))
        elif suffix == ".json":
            rows = _read_json(path)
        elif suffix == ".csv":
            rows = _read_csv(path)
        elif suffix == ".parquet":
            rows = _read_with_datasets("parquet", str(path), data_files=str(path))
        else:
            raise UserError(
                f"{path}: unsupported data file type '{suffix}'; use .jsonl, .json, .parquet or .csv"
            )
        if not rows:
            raise UserError(f"{path}: no rows; the file is empty")
        return rows
    rows = _read_with_datasets(source, f"{source}[{split}]", split=split)
    if not rows:
        raise UserError(f"{source}: split '{split}' has no rows")
    return rows


def _read_jsonl(path: Path) -> Iterator[Row]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                # utf-8-sig: editors on Windows start the file with a byte-order mark.
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(
                    f"{where}: not valid UTF-8 (byte {exc.start}); re-save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{where}: invalid JSON at column {exc.colno}: {exc.msg}") from None
            if not isinstance(data, dict):
                raise UserError(f"{where}: each line must be a JSON object, got {type(data).__name__}")
            yield Row(where, data)


def _read_json(path: Path) -> list[Row]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not valid UTF-8 (byte {exc.start}); re-save the file as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: invalid JSON at column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of objects (or use .jsonl, one object per line)")
    rows = []
    for index, item in enumerate(data):
        where = f"{path}: item {index}"
        if not isinstance(item, dict):
            raise UserError(f"{where}: each item must be a JSON object, got {type(item).__name__}")
        rows.append(Row(where, item))
    return rows


def _read_csv(path: Path) -> list[Row]:
    # The stdlib reader keeps every cell a string: a type-inferring reader turns an answer "02" into 2.
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            rows = []
            for data in reader:
                where = f"{path}:{reader.line_num}"
                if None in data:
                    raise UserError(
                        f"{where}: more cells than the header has columns; quote cells with commas"
                    )
                rows.append(Row(where, {k: v for k, v in data.items() if v is not None}))
            return rows
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not valid UTF-8 (byte {exc.start}); re-save the file as UTF-8") from None
    except csv.Error as exc:
        raise UserError(f"{path}: malformed CSV: {exc}") from None


def _read_with_datasets(
    name: str, label: str, split: str = "train", data_files: str | None = None
) -> list[Row]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency; this guards broken installs
        raise UserError(
            f"{label}: reading this needs the 'datasets' package (pip install datasets)"
        ) from None
    try:
        dataset = datasets.load_dataset(name, data_files=data_files, split=split)
    except FileNotFoundError:
        raise UserError(
            f"{label}: not a local file and not found on the hub (check the path, relative to the recipe)"
        ) from None
    except Exception as exc:  # datasets raises many types for unreachable or malformed sources
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{label}: cannot load the dataset: {first}") from None
    return [Row(f"{label} row {i}", dict(item)) for i, item in enumerate(dataset)]


def detect_format(rows: list[Row], fmt: str, key: str = "data.format") -> str:
    """The format named in the recipe, or the one whose keys the first row has."""
    if fmt != "auto":
        return fmt
    first = rows[0]
    for name, keys in FORMAT_KEYS.items():
        if all(k in first.data for k in keys):
            return name
    expected = "; ".join(f"{name} ({', '.join(keys)})" for name, keys in FORMAT_KEYS.items())
    raise UserError(
        f"{first.where}: cannot tell the data format from keys {sorted(first.data)}; expected {expected}, "
        f"or set {key}"
    )


@dataclass
class Conversation:
    messages: list[dict]
    trained_from: int = 0
    """Assistant turns before this index are context (a prompt given as messages), not trained."""


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
    return Conversation(messages, trained_from)


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
        if role not in ROLES:
            raise UserError(f"{where}: {name}.role '{role}' is not one of {', '.join(ROLES)}")
        message: dict = {"role": role}
        if role == "assistant" and turn.get("tool_calls"):
            message["content"] = _optional_text(turn, "content", where, f"{name}.content")
            message["tool_calls"] = _tool_calls(turn["tool_calls"], where, f"{name}.tool_calls")
        else:
            message["content"] = _require(turn, "content", str, where, f"{name}.content")
        if role == "assistant" and isinstance(turn.get("reasoning_content"), str):
            message["reasoning_content"] = turn["reasoning_content"]
        if role == "tool":
            for extra in ("tool_call_id", "name"):
                if isinstance(turn.get(extra), str):
                    message[extra] = turn[extra]
        messages.append(message)
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
            messages.append(_sharegpt_call(value, where, f"conversations[{i}].value"))
        else:
            messages.append({"role": role, "content": value})
    system = data.get("system")
    if system is not None and not isinstance(system, str):
        raise UserError(f"{where}: 'system' must be a string, got {type(system).__name__}")
    if system and system.strip():
        if messages and messages[0]["role"] == "system":
            raise UserError(f"{where}: a 'system' field and a system turn in 'conversations': keep one")
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _sharegpt_call(value: str, where: str, name: str) -> dict:
    """A ShareGPT function_call turn: its value is the call as JSON ({"name", "arguments"}, or a list)."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{where}: {name} is not JSON ({exc.msg}); a function_call holds {{'name', 'arguments'}}"
        ) from None
    calls = parsed if isinstance(parsed, list) else [parsed]
    if not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        raise UserError(f"{where}: {name} must hold {{'name', 'arguments'}} (or a list of them)")
    spelled = [{"function": {"name": c["name"], "arguments": c.get("arguments", {})}} for c in calls]
    return {"role": "assistant", "content": None, "tool_calls": _tool_calls(spelled, where, name)}


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


@dataclass
class DataReport:
    """What happened to a dataset on its way to training; printed by `validate` and at the start of a run."""

    source: str
    rows: int = 0
    kept: int = 0
    dropped_overlong: int = 0
    truncated: int = 0
    eos_appended: int = 0
    turns_unmasked: int = 0
    trained_tokens: int = 0
    lengths: list[int] | None = None

    def percentiles(self) -> dict[str, int]:
        lengths = sorted(self.lengths or [])
        if not lengths:
            return {}
        pick = {"min": 0.0, "p50": 0.5, "p90": 0.9, "p99": 0.99, "max": 1.0}
        return {
            name: lengths[min(len(lengths) - 1, round(q * (len(lengths) - 1)))] for name, q in pick.items()
        }

    def warnings(self, stage: str) -> list[str]:
        out = []
        if self.dropped_overlong:
            out.append(
                f"{self.source}: dropped {self.dropped_overlong} of {self.rows} rows longer than "
                f"{stage}.max_length (raise it, or set {stage}.overlong: truncate)"
            )
        if self.truncated:
            out.append(f"{self.source}: truncated {self.truncated} of {self.rows} rows to {stage}.max_length")
        if self.eos_appended:
            out.append(
                f"{self.source}: the chat template ends {self.eos_appended} final assistant turns without a "
                "special token; appended the tokenizer's EOS so the model learns to stop"
            )
        if self.turns_unmasked:
            out.append(
                f"{self.source}: {self.turns_unmasked} earlier assistant turns are not trained: "
                "the chat template does not show their content (or their end) in the conversation"
            )
        return out


def pad(sequences: list[list[int]], value: int) -> list[list[int]]:
    width = max(len(s) for s in sequences)
    return [s + [value] * (width - len(s)) for s in sequences]
