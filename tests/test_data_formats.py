"""Reading data: every format and file type, line numbers that stay right, and over-long rows counted."""

from __future__ import annotations

import json

import pytest
from conftest import TOKENIZER, write_jsonl

from qalign.data import detect_format, read_rows, to_messages
from qalign.errors import UserError
from qalign.sft import prepare_sft

USER_ASSISTANT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
ROWS = {
    "messages": {"messages": [{"role": "system", "content": "Be kind."}, *USER_ASSISTANT]},
    "sharegpt": {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"},
                                   {"from": "gpt", "value": "Hello."}]},
    "alpaca": {"instruction": "Greet me", "input": "politely", "output": "Hello."},
    "prompt_completion": {"prompt": "Hi", "completion": "Hello."},
}  # fmt: skip


@pytest.mark.parametrize("fmt", list(ROWS))
def test_each_format_is_detected_and_converted(tmp_path, fmt):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[fmt]])
    rows = read_rows(str(path))
    assert detect_format(rows, "auto") == fmt
    messages = to_messages(rows[0], fmt)
    assert messages[-1] == {"role": "assistant", "content": "Hello."}
    if fmt in ("messages", "sharegpt"):
        assert messages[0] == {"role": "system", "content": "Be kind."}
    if fmt == "alpaca":
        assert messages[0] == {"role": "user", "content": "Greet me\n\npolitely"}


def test_alpaca_without_input_and_an_explicit_format(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Say hi", "input": "", "output": "hi"}])
    assert to_messages(read_rows(str(path))[0], "alpaca")[0]["content"] == "Say hi"


def test_json_parquet_and_csv_files(tmp_path):
    import pandas as pd

    (tmp_path / "d.json").write_text(json.dumps([ROWS["prompt_completion"]] * 3))
    pd.DataFrame([ROWS["prompt_completion"]] * 3).to_parquet(tmp_path / "d.parquet")
    pd.DataFrame([ROWS["alpaca"]] * 3).to_csv(tmp_path / "d.csv", index=False)
    for name, fmt in (
        ("d.json", "prompt_completion"),
        ("d.parquet", "prompt_completion"),
        ("d.csv", "alpaca"),
    ):
        rows = read_rows(str(tmp_path / name))
        assert len(rows) == 3 and detect_format(rows, "auto") == fmt, name
        assert to_messages(rows[2], fmt)[-1]["content"] == "Hello."
        assert name in rows[2].where


def test_line_numbers_count_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps(ROWS["messages"]) + "\n\n\n" + json.dumps(ROWS["messages"]) + "\n" + '{"messages": 5}\n'
    )
    rows = read_rows(str(path))
    assert [r.where.rsplit(":", 1)[1] for r in rows] == ["1", "4", "5"]
    with pytest.raises(UserError, match=r"d\.jsonl:5: 'messages' must be a list"):
        to_messages(rows[2], "messages")


def test_unknown_keys_list_the_formats(tmp_path):
    rows = read_rows(str(write_jsonl(tmp_path / "d.jsonl", [{"q": 1}])))
    with pytest.raises(UserError, match=r"d\.jsonl:1: cannot tell the data format.*prompt_completion"):
        detect_format(rows, "auto")


def test_overlong_rows_are_dropped_or_truncated_and_counted(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    short = ROWS["prompt_completion"]
    long_reply = {"prompt": "Hi", "completion": "word " * 100}
    long_prompt = {"prompt": "word " * 100, "completion": "ok"}
    rows = read_rows(str(write_jsonl(tmp_path / "d.jsonl", [short, long_reply, long_prompt])))
    kept, report = prepare_sft(rows, "auto", tokenizer, 40, "drop", "d.jsonl")
    assert (report.rows, report.kept, report.dropped_overlong, report.truncated) == (3, 1, 2, 0)
    assert "dropped 2 of 3 rows" in report.warnings("sft")[0]
    kept, report = prepare_sft(rows, "auto", tokenizer, 40, "truncate", "d.jsonl")
    # The long reply is cut to 40 tokens; the long prompt leaves nothing to train on once cut, so it is dropped.
    assert (report.kept, report.truncated, report.dropped_overlong) == (2, 1, 1)
    assert all(len(e.input_ids) <= 40 for e in kept)
    assert report.percentiles()["max"] == 40
