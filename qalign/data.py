"""Reading and checking training data: files and hub datasets in, validated conversations out.

Every row is checked before any training starts, and every problem names its file and line. Local JSONL is
parsed here (not by `datasets`) so that line numbers are exact; parquet, CSV and hub ids go through
`datasets` and are named by row number.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from qalign.conversation import Conversation as Conversation
from qalign.conversation import check_turns as check_turns
from qalign.conversation import parse_messages as parse_messages
from qalign.conversation import to_conversation as to_conversation
from qalign.conversation import to_messages as to_messages
from qalign.errors import UserError

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
                end = len(line.rstrip("\r\n"))
                if exc.pos >= len(line.rstrip()) or exc.msg.startswith("Unterminated string"):
                    # The object is still open where the line stops: the error is where the line breaks.
                    raise UserError(
                        f"{where}: the line ends at column {end} before its JSON object is complete; each line "
                        "must hold one whole object (the line may be cut short, or a value broken over two lines: "
                        "write a newline inside a string as \\n)"
                    ) from None
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
        f"or set {key}; map columns of other names with {key.rsplit('.', 1)[0]}.columns"
    )


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
    unanswered_opening: int = 0
    turns_apart: int = 0
    """Earlier assistant turns trained in a row of their own, after exactly the prompt `qalign chat` gives them."""
    inexact_prompts: int = 0
    """Replies whose tokens before them are still not chat's prompt for their history."""
    tools_ignored: int = 0
    """Rows with "tools" that the chat template does not render."""
    trained_tokens: int = 0
    lengths: list[int] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(why, where) for each row left out before rendering (HH-RLHF rows with an empty or missing turn)."""

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
        reasons: dict[str, list[str]] = {}
        for why, where in self.skipped:
            reasons.setdefault(why, []).append(where)
        for why, wheres in reasons.items():
            named = ", ".join(wheres[:3]) + (f" and {len(wheres) - 3} more" if len(wheres) > 3 else "")
            out.append(f"{self.source}: left out {len(wheres)} of {self.rows} rows: {why} ({named})")
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
        if self.unanswered_opening:
            out.append(
                f"{self.source}: {self.unanswered_opening} replies carry no reasoning, but the chat template's "
                "generation prompt opens one (e.g. <think>): the model learns to answer inside it"
            )
        if self.turns_apart:
            out.append(
                f"{self.source}: {self.turns_apart} earlier assistant turns are trained in a row of their own: "
                "in the whole conversation the tokens before them are not the prompt `qalign chat` gives them "
                "(the template shows the history otherwise, or a token merges across the start of the reply)"
            )
        if self.inexact_prompts:
            out.append(
                f"{self.source}: {self.inexact_prompts} replies are trained after tokens that differ from the "
                "prompt `qalign chat` gives them"
            )
        if self.tools_ignored:
            out.append(
                f"{self.source}: {self.tools_ignored} rows define 'tools' but the chat template does not render "
                "them: the model is trained without seeing the tool definitions"
            )
        return out


def pad(sequences: list[list[int]], value: int) -> list[list[int]]:
    width = max(len(s) for s in sequences)
    return [s + [value] * (width - len(s)) for s in sequences]
