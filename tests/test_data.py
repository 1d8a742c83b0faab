"""Reading data: every format and file type, bad rows named by file:line, and prepare_sft's report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TOKENIZER, write_jsonl

from qalign.chat_template import IGNORE, render_conversation
from qalign.data import DataReport, Row, detect_format, read_rows, to_messages
from qalign.errors import UserError
from qalign.sft import prepare_sft

FORMAT_NAMES = ("messages", "sharegpt", "alpaca", "prompt_completion")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    """Raw lines (already serialised), each ended by a newline."""
    data = b"".join((line if isinstance(line, bytes) else line.encode("utf-8")) + b"\n" for line in lines)
    path.write_bytes(data)
    return path


def convert_all(path: Path, fmt: str = "auto") -> list[list[dict]]:
    rows = read_rows(str(path))
    fmt = detect_format(rows, fmt)
    return [to_messages(row, fmt) for row in rows]


# ----------------------------------------------------------------------------------------------------------
# Formats

CASES = {
    "messages": (
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                user("What is 2 + 3?"),
                assistant("5."),
                user("And 4 + 4?"),
                assistant("8."),
            ]
        },
        [
            {"role": "system", "content": "Be brief."},
            user("What is 2 + 3?"),
            assistant("5."),
            user("And 4 + 4?"),
            assistant("8."),
        ],
    ),
    "sharegpt": (
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "What is 2 + 3?"},
                {"from": "gpt", "value": "5."},
                {"from": "human", "value": "And 4 + 4?"},
                {"from": "gpt", "value": "8."},
            ]
        },
        [
            {"role": "system", "content": "Be brief."},
            user("What is 2 + 3?"),
            assistant("5."),
            user("And 4 + 4?"),
            assistant("8."),
        ],
    ),
    "alpaca": (
        {"instruction": "Add the numbers.", "input": "2 3", "output": "5"},
        [user("Add the numbers.\n\n2 3"), assistant("5")],
    ),
    "prompt_completion": (
        {"prompt": "What is 2 + 3?", "completion": "5."},
        [user("What is 2 + 3?"), assistant("5.")],
    ),
}


@pytest.mark.parametrize("fmt", list(CASES))
def test_each_format_is_detected_by_auto_and_converted(tmp_path, fmt):
    row, expected = CASES[fmt]
    path = write_jsonl(tmp_path / "d.jsonl", [row, row])
    rows = read_rows(str(path))
    assert [r.where for r in rows] == [f"{path}:1", f"{path}:2"]
    assert detect_format(rows, "auto") == fmt
    assert [to_messages(r, fmt) for r in rows] == [expected, expected]


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"instruction": "Say hi.", "output": "hi"}, [user("Say hi."), assistant("hi")]),
        ({"instruction": "Say hi.", "input": "", "output": "hi"}, [user("Say hi."), assistant("hi")]),
        ({"instruction": "Say hi.", "input": "  ", "output": "hi"}, [user("Say hi."), assistant("hi")]),
        ({"instruction": "Say hi.", "input": None, "output": "hi"}, [user("Say hi."), assistant("hi")]),
        (
            {"instruction": "Say hi.", "input": "to Bo", "output": "hi"},
            [user("Say hi.\n\nto Bo"), assistant("hi")],
        ),
        (
            {"instruction": "Say hi.", "output": "hi", "system": "Be warm."},
            [{"role": "system", "content": "Be warm."}, user("Say hi."), assistant("hi")],
        ),
    ],
)
def test_alpaca_with_and_without_input(tmp_path, row, expected):
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    assert convert_all(path) == [expected]


def test_sharegpt_speaker_names_are_case_insensitive(tmp_path):
    row = {"conversations": [{"from": "Human", "value": "Hi"}, {"from": "GPT", "value": "Hello"}]}
    assert convert_all(write_jsonl(tmp_path / "d.jsonl", [row])) == [[user("Hi"), assistant("Hello")]]


def test_an_explicit_format_wins_over_detection(tmp_path):
    row = {
        "messages": [user("from messages"), assistant("m")],
        "prompt": "from prompt",
        "completion": "c",
    }
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    rows = read_rows(str(path))
    assert detect_format(rows, "auto") == "messages"
    assert detect_format(rows, "prompt_completion") == "prompt_completion"
    assert convert_all(path, "prompt_completion") == [[user("from prompt"), assistant("c")]]
    assert convert_all(path) == [[user("from messages"), assistant("m")]]


def test_an_explicit_format_that_does_not_match_the_rows_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"}])
    with pytest.raises(UserError) as info:
        convert_all(path, "messages")
    assert str(info.value).startswith(f"{path}:1: ") and "'messages'" in str(info.value)


def test_unrecognisable_keys_name_the_line_and_list_the_formats(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    rows = read_rows(str(path))
    with pytest.raises(UserError) as info:
        detect_format(rows, "auto", "sft.data.format")
    message = str(info.value)
    assert message.startswith(f"{path}:1: ")
    assert "['answer', 'question']" in message
    for name in FORMAT_NAMES:
        assert name in message
    assert "sft.data.format" in message


def test_json_array_files(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(
        json.dumps([CASES["prompt_completion"][0], CASES["messages"][0]], indent=2), encoding="utf-8"
    )
    rows = read_rows(str(path))
    assert [r.where for r in rows] == [f"{path}: item 0", f"{path}: item 1"]
    assert to_messages(rows[0], "prompt_completion") == CASES["prompt_completion"][1]
    assert to_messages(rows[1], "messages") == CASES["messages"][1]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"prompt": "a"}', "expected a JSON array"),
        ('[{"prompt": "a", "completion": "b"}, 3]', "item 1: each item must be a JSON object"),
        ('[\n  {"prompt": "a",\n  oops\n]', ":3: invalid JSON"),
        ("[]", "no rows"),
    ],
)
def test_bad_json_array_files(tmp_path, content, expected):
    path = tmp_path / "d.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as info:
        read_rows(str(path))
    assert str(info.value).startswith(str(path))
    assert expected in str(info.value)


def test_parquet_via_datasets(tmp_path):
    import pandas as pd

    path = tmp_path / "d.parquet"
    pd.DataFrame([CASES["messages"][0], {"messages": [user("Hi"), assistant("Hello")]}]).to_parquet(path)
    rows = read_rows(str(path))
    assert [r.where for r in rows] == [f"{path} row 0", f"{path} row 1"]
    assert detect_format(rows, "auto") == "messages"
    assert [to_messages(r, "messages") for r in rows] == [
        CASES["messages"][1],
        [user("Hi"), assistant("Hello")],
    ]


def test_csv_rows_name_their_line(tmp_path):
    import pandas as pd

    path = tmp_path / "d.csv"
    pd.DataFrame(
        [
            {"instruction": "Add the numbers.", "input": "2 3", "output": "5"},
            {"instruction": "Say hi.", "input": "", "output": "hi"},
        ]
    ).to_csv(path, index=False)
    rows = read_rows(str(path))
    assert [r.where for r in rows] == [f"{path}:2", f"{path}:3"]
    assert detect_format(rows, "auto") == "alpaca"
    assert [to_messages(r, "alpaca") for r in rows] == [
        [user("Add the numbers.\n\n2 3"), assistant("5")],
        [user("Say hi."), assistant("hi")],
    ]


def test_csv_text_columns_that_look_like_numbers_stay_text(tmp_path):
    import pandas as pd

    path = tmp_path / "d.csv"
    pd.DataFrame(
        [{"prompt": "What is 2 + 3?", "completion": "5"}, {"prompt": "What is 1 + 1?", "completion": "02"}]
    ).to_csv(path, index=False)
    assert convert_all(path) == [
        [user("What is 2 + 3?"), assistant("5")],
        [user("What is 1 + 1?"), assistant("02")],
    ]


def test_a_bad_row_in_a_csv_names_its_row(tmp_path):
    import pandas as pd

    path = tmp_path / "d.csv"
    pd.DataFrame([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": " "}]).to_csv(
        path, index=False
    )
    with pytest.raises(UserError) as info:
        convert_all(path)
    assert str(info.value).startswith(f"{path}:3: ")


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_a_byte_order_mark_is_accepted(tmp_path, suffix):
    path = tmp_path / f"d{suffix}"
    body = {
        ".jsonl": '{"prompt": "p", "completion": "c"}\n',
        ".json": '[{"prompt": "p", "completion": "c"}]',
        ".csv": "prompt,completion\np,c\n",
    }[suffix]
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    assert convert_all(path) == [[user("p"), assistant("c")]]


def test_a_csv_row_with_extra_cells_is_an_error(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\np,c,oops\n", encoding="utf-8")
    with pytest.raises(UserError) as info:
        read_rows(str(path))
    assert str(info.value).startswith(f"{path}:2: more cells")


@pytest.mark.parametrize("suffix", [".txt", ".yaml"])
def test_unsupported_file_types_are_errors(tmp_path, suffix):
    path = tmp_path / f"d{suffix}"
    path.write_text("x\n", encoding="utf-8")
    with pytest.raises(UserError) as info:
        read_rows(str(path))
    assert str(info.value).startswith(f"{path}: ") and suffix in str(info.value)


def test_a_folder_is_an_error(tmp_path):
    with pytest.raises(UserError) as info:
        read_rows(str(tmp_path))
    assert str(info.value).startswith(f"{tmp_path}: ") and "folder" in str(info.value)


# ----------------------------------------------------------------------------------------------------------
# Bad rows: each names file:LINE of the bad line

GOOD = json.dumps({"messages": [user("Hi"), assistant("Hello")]})
GOOD_SHAREGPT = json.dumps(
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}
)


def msgs(*turns) -> str:
    return json.dumps({"messages": list(turns)})


BAD_ROWS = [
    pytest.param(GOOD, '{"messages": [}', "invalid JSON at column 15", id="invalid-json"),
    # A line cut short (or a string broken over two lines) is reported where the line ends, not at column 1.
    pytest.param(
        GOOD,
        '{"messages": [',
        "the line ends at column 14 before its JSON object is complete",
        id="cut-short",
    ),
    pytest.param(
        GOOD, '{"prompt": "line one', "the line ends at column 20 before its JSON object", id="broken-string"
    ),
    pytest.param(GOOD, b'{"prompt": "caf\xe9", "completion": "x"}', "not valid UTF-8", id="invalid-utf8"),
    pytest.param(GOOD, "[1, 2]", "must be a JSON object, got list", id="not-an-object"),
    pytest.param(GOOD, '"just a string"', "must be a JSON object, got str", id="a-string"),
    pytest.param(GOOD, json.dumps({"msgs": []}), "missing field 'messages'", id="missing-messages"),
    pytest.param(GOOD, json.dumps({"messages": "Hi"}), "'messages' must be a list, got str", id="not-a-list"),
    pytest.param(
        GOOD, json.dumps({"messages": ["Hi"]}), "messages[0] must be an object", id="turn-not-object"
    ),
    pytest.param(
        GOOD,
        msgs({"role": 1, "content": "Hi"}, assistant("x")),
        "'messages[0].role' must be a string",
        id="role-int",
    ),
    pytest.param(
        GOOD, msgs({"content": "Hi"}, assistant("x")), "missing field 'messages[0].role'", id="no-role"
    ),
    pytest.param(
        GOOD,
        msgs({"role": "bot", "content": "Hi"}, assistant("x")),
        "messages[0].role 'bot'",
        id="unknown-role",
    ),
    pytest.param(
        GOOD,
        msgs(user("Hi"), {"role": "assistant", "content": None}),
        "'messages[1].content'",
        id="content-null",
    ),
    pytest.param(
        GOOD, msgs(user("Hi"), {"role": "assistant", "content": 5}), "must be a string", id="content-int"
    ),
    pytest.param(GOOD, msgs(user("Hi"), assistant("")), "turn 1 (assistant) is empty", id="empty-assistant"),
    pytest.param(
        GOOD, msgs(user("Hi"), assistant(" \n ")), "turn 1 (assistant) is empty", id="blank-assistant"
    ),
    pytest.param(GOOD, msgs(user(""), assistant("x")), "turn 0 (user) is empty", id="empty-user"),
    pytest.param(GOOD, msgs(assistant("Hi"), user("x")), "turn 0 is 'assistant'", id="assistant-first"),
    pytest.param(GOOD, msgs(user("a"), user("b"), assistant("c")), "turn 1 is 'user'", id="two-users"),
    pytest.param(GOOD, msgs(user("a")), "no assistant turn", id="no-assistant"),
    pytest.param(GOOD, msgs({"role": "system", "content": "s"}), "no assistant turn", id="only-system"),
    pytest.param(GOOD, json.dumps({"messages": []}), "empty", id="empty-messages"),
    pytest.param(
        GOOD,
        msgs(user("a"), {"role": "system", "content": "s"}, assistant("c")),
        "turn 1 is 'system'",
        id="late-system",
    ),
    pytest.param(
        GOOD_SHAREGPT,
        json.dumps({"conversations": [{"from": "robot", "value": "Hi"}, {"from": "gpt", "value": "x"}]}),
        "conversations[0].from 'robot'",
        id="sharegpt-unknown-from",
    ),
    pytest.param(
        GOOD_SHAREGPT,
        json.dumps({"conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]}),
        "missing field 'conversations[0].value'",
        id="sharegpt-no-value",
    ),
    pytest.param(
        json.dumps({"prompt": "p", "completion": "c"}),
        json.dumps({"prompt": "p"}),
        "missing field 'completion'",
        id="pc-missing-completion",
    ),
    pytest.param(
        json.dumps({"instruction": "i", "output": "o"}),
        json.dumps({"instruction": "i", "input": 3, "output": "o"}),
        "'input' must be a string",
        id="alpaca-input-int",
    ),
]


@pytest.mark.parametrize(("good", "bad", "expected"), BAD_ROWS)
def test_bad_rows_name_the_file_and_line(tmp_path, good, bad, expected):
    path = write_lines(tmp_path / "d.jsonl", [good, good, bad, good])
    with pytest.raises(UserError) as info:
        convert_all(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: "), message
    assert expected in message


def test_blank_lines_are_skipped_and_line_numbers_stay_right(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [GOOD, GOOD, "", "  \t", GOOD, msgs(user("a"), user("b"))])
    with pytest.raises(UserError) as info:
        convert_all(path)
    assert str(info.value).startswith(f"{path}:6: ")
    good = write_lines(tmp_path / "good.jsonl", [GOOD, "", GOOD, "   ", GOOD])
    assert [r.where for r in read_rows(str(good))] == [f"{good}:1", f"{good}:3", f"{good}:5"]


def test_bad_row_on_line_5_after_a_blank_line_3(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [GOOD, GOOD, "", GOOD, '{"messages": [}'])
    with pytest.raises(UserError) as info:
        read_rows(str(path))
    assert str(info.value).startswith(f"{path}:5: invalid JSON")


def test_crlf_line_endings(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(f"{GOOD}\r\n\r\n{GOOD}\r\n".encode())
    assert [r.where for r in read_rows(str(path))] == [f"{path}:1", f"{path}:3"]


@pytest.mark.parametrize("content", [b"", b"\n\n", b"  \n\t\n"])
def test_an_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError) as info:
        read_rows(str(path))
    assert str(info.value).startswith(f"{path}: ") and "empty" in str(info.value)


# ----------------------------------------------------------------------------------------------------------
# prepare_sft


def conversation(prompt: str, reply: str) -> dict:
    return {"messages": [user(prompt), assistant(reply)]}


def rows_of(items: list[dict], name: str = "d.jsonl") -> list[Row]:
    return [Row(f"{name}:{i + 1}", item) for i, item in enumerate(items)]


def length(tokenizer, item: dict) -> int:
    return len(render_conversation(tokenizer, item["messages"]).input_ids)


def test_prepare_sft_keeps_rows_that_fit(tokenizer):
    items = [conversation("What is 2 + 3?", "The answer is 5."), conversation("Hi", "Hello.")]
    examples, report = prepare_sft(rows_of(items), "auto", tokenizer, 512, "drop", "d.jsonl")
    assert (report.rows, report.kept, report.dropped_overlong, report.truncated) == (2, 2, 0, 0)
    for example, item in zip(examples, items, strict=True):
        rendered = render_conversation(tokenizer, item["messages"])
        assert example.input_ids == rendered.input_ids
        assert example.labels == rendered.labels
    assert [e.where for e in examples] == ["d.jsonl:1", "d.jsonl:2"]
    assert report.lengths == [len(e.input_ids) for e in examples]
    assert report.trained_tokens == sum(e.weight for e in examples) > 0
    assert report.warnings("sft") == []


def test_overlong_rows_are_dropped_and_counted_by_default(tokenizer):
    short = conversation("Hi", "Hello.")
    long = conversation("Tell me a story. " * 30, "Once upon a time.")
    limit = length(tokenizer, short) + 5
    assert length(tokenizer, long) > limit
    examples, report = prepare_sft(rows_of([short, long, short]), "auto", tokenizer, limit, "drop", "d.jsonl")
    assert [e.where for e in examples] == ["d.jsonl:1", "d.jsonl:3"]
    assert (report.rows, report.kept, report.dropped_overlong, report.truncated) == (3, 2, 1, 0)
    assert len(report.lengths) == 2
    warnings = report.warnings("sft")
    assert len(warnings) == 1
    assert "dropped 1 of 3 rows" in warnings[0]
    assert "sft.max_length" in warnings[0] and "sft.overlong: truncate" in warnings[0]
    assert warnings[0].startswith("d.jsonl: ")


def test_a_row_exactly_at_max_length_is_kept(tokenizer):
    item = conversation("Hi", "Hello.")
    n = length(tokenizer, item)
    examples, report = prepare_sft(rows_of([item]), "auto", tokenizer, n, "drop", "d.jsonl")
    assert report.kept == 1 and report.dropped_overlong == 0 and len(examples[0].input_ids) == n


def test_overlong_truncate_cuts_and_counts(tokenizer):
    item = conversation("Hi", "Once upon a time there was a very long story. " * 10)
    full = render_conversation(tokenizer, item["messages"])
    limit = len(full.input_ids) - 10
    examples, report = prepare_sft(rows_of([item]), "auto", tokenizer, limit, "truncate", "d.jsonl")
    assert (report.kept, report.truncated, report.dropped_overlong) == (1, 1, 0)
    assert examples[0].input_ids == full.input_ids[:limit]
    assert examples[0].labels == full.labels[:limit]
    assert report.lengths == [limit]
    assert any("truncated 1 of 1 rows to sft.max_length" in w for w in report.warnings("sft"))


def test_truncation_that_leaves_no_trained_token_drops_the_row(tokenizer):
    fits = conversation("Hi", "Hello.")
    prompt_heavy = conversation("Tell me a story. " * 30, "Once upon a time.")
    limit = length(tokenizer, fits) + 2
    rendered = render_conversation(tokenizer, prompt_heavy["messages"])
    assert all(label == IGNORE for label in rendered.labels[:limit])  # the cut ends inside the prompt
    examples, report = prepare_sft(
        rows_of([fits, prompt_heavy]), "auto", tokenizer, limit, "truncate", "d.jsonl"
    )
    assert [e.where for e in examples] == ["d.jsonl:1"]
    assert (report.kept, report.truncated, report.dropped_overlong) == (1, 0, 1)
    assert any("dropped 1 of 2 rows" in w for w in report.warnings("sft"))


def test_prepare_sft_stops_at_the_first_bad_row(tokenizer, tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [GOOD, GOOD, msgs(user("a"), assistant(""))])
    with pytest.raises(UserError) as info:
        prepare_sft(read_rows(str(path)), "auto", tokenizer, 512, "drop", str(path))
    assert str(info.value).startswith(f"{path}:3: ")


def test_prepare_sft_format_error_names_the_format_key(tokenizer):
    with pytest.raises(UserError) as info:
        prepare_sft(rows_of([{"q": "a"}]), "auto", tokenizer, 512, "drop", "d.jsonl")
    assert str(info.value).startswith("d.jsonl:1: ") and "sft.data.format" in str(info.value)


def test_percentiles_on_known_lengths():
    lengths = list(range(101, 0, -1))  # 1..101, unsorted
    report = DataReport(source="x", lengths=lengths)
    assert report.percentiles() == {"min": 1, "p50": 51, "p90": 91, "p99": 100, "max": 101}
    # Nearest rank, rounded: with 10 values p99 is index round(8.91) = 9, the maximum.
    ten = DataReport(source="x", lengths=[3, 1, 4, 10, 5, 9, 2, 6, 8, 7]).percentiles()
    assert ten == {"min": 1, "p50": 5, "p90": 9, "p99": 10, "max": 10}
    assert DataReport(source="x", lengths=[7]).percentiles() == {
        "min": 7,
        "p50": 7,
        "p90": 7,
        "p99": 7,
        "max": 7,
    }
    assert DataReport(source="x", lengths=[]).percentiles() == {}
    assert DataReport(source="x").percentiles() == {}
    assert lengths == list(range(101, 0, -1))  # not sorted in place


def test_percentiles_from_prepare_sft(tokenizer):
    items = [conversation("Hi", "Hello." * n) for n in (1, 4, 8)]
    examples, report = prepare_sft(rows_of(items), "auto", tokenizer, 512, "drop", "d.jsonl")
    sizes = sorted(len(e.input_ids) for e in examples)
    stats = report.percentiles()
    assert stats["min"] == sizes[0] and stats["max"] == sizes[-1] and stats["p50"] == sizes[1]


def test_warnings_name_the_stage():
    report = DataReport(
        source="d.jsonl", rows=10, dropped_overlong=3, truncated=2, eos_appended=1, turns_unmasked=4
    )
    warnings = report.warnings("dpo")
    assert len(warnings) == 4
    assert "dropped 3 of 10 rows longer than dpo.max_length" in warnings[0]
    assert "dpo.overlong: truncate" in warnings[0]
    assert "truncated 2 of 10 rows to dpo.max_length" in warnings[1]
    assert all(w.startswith("d.jsonl: ") for w in warnings)
