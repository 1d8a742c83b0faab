"""`data.columns`: a dataset's own column names read as the format's fields, for every format, train and eval,
every file type; a missing column names itself and the columns the row has."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import write_jsonl, write_recipe
from test_cli_sft import qalign

from qalign.columns import map_columns
from qalign.data import Row, detect_format, read_rows, to_messages
from qalign.dpo import split_preference
from qalign.errors import UserError
from qalign.recipe_docs import render_reference
from qalign.recipe_load import parse_recipe
from qalign.stage_data import shape_rows


def recipe_text(sft_columns: str = "{}", dpo_columns: str = "{}") -> str:
    return (
        "name: t\nmodel: {base: Qwen/Qwen2.5-0.5B}\n"
        f"sft:\n  data:\n    train: org/sft-data\n    columns: {sft_columns}\n"
        f"dpo:\n  data:\n    train: org/dpo-data\n    columns: {dpo_columns}\n"
    )


def parse(sft_columns: str = "{}", dpo_columns: str = "{}"):
    return parse_recipe(recipe_text(sft_columns, dpo_columns), Path("recipe.yaml"), [])


def test_the_recipe_maps_fields_to_columns_and_names_a_field_no_format_reads():
    recipe = parse(
        "{instruction: q, output: a}", "{prompt: question, chosen: response_j, rejected: response_k}"
    )
    assert recipe.sft.data.columns == {"instruction": "q", "output": "a"}
    assert recipe.dpo.data.columns["chosen"] == "response_j"
    with pytest.raises(UserError, match=r"^recipe.yaml:6: sft.data.columns: unknown field 'promt'; did you mean "
                       r"'prompt'\? the fields are: messages, conversations"):  # fmt: skip
        parse("{promt: question}")
    # DPO reads pairs (or KTO's unpaired rows): an instruction is no field of it.
    with pytest.raises(UserError, match=r"recipe.yaml:10: dpo.data.columns: unknown field 'instruction'; the "
                       r"fields are: prompt, chosen, rejected, tools, completion, label$"):  # fmt: skip
        parse(dpo_columns="{instruction: q}")
    assert (
        parse(dpo_columns="{completion: answer, label: thumbs_up}").dpo.data.columns["label"] == "thumbs_up"
    )


def test_two_fields_reading_one_column_is_an_error():
    # Training on a completion that is also the prompt teaches the model to repeat the prompt.
    with pytest.raises(UserError, match=r"'prompt' and 'completion' both read column 'text'"):
        parse("{prompt: text, completion: text}")
    with pytest.raises(UserError, match=r"'chosen' names no column"):
        parse(dpo_columns="{chosen: ''}")


def test_the_key_reference_shows_the_mapping_type():
    assert "| `sft.data.columns` | `map str -> str` | `{}` |" in render_reference()


@pytest.mark.parametrize(
    ("columns", "data", "fmt"),
    [
        ({"instruction": "q", "output": "a"}, {"q": "Greet me", "a": "Hello."}, "alpaca"),
        ({"messages": "conversation"}, {"conversation": [{"role": "user", "content": "Greet me"},
                                                         {"role": "assistant", "content": "Hello."}]}, "messages"),
        ({"conversations": "turns"}, {"turns": [{"from": "human", "value": "Greet me"},
                                                {"from": "gpt", "value": "Hello."}]}, "sharegpt"),
        ({"prompt": "question", "completion": "answer"}, {"question": "Greet me", "answer": "Hello."},
         "prompt_completion"),
    ],
)  # fmt: skip
def test_every_sft_format_is_detected_from_the_mapped_names(tmp_path, columns, data, fmt):
    rows = read_rows(str(write_jsonl(tmp_path / "d.jsonl", [data])))
    with pytest.raises(UserError, match="cannot tell the data format"):
        detect_format(rows, "auto")  # the dataset's own names fit no format
    spec = parse(json.dumps(columns)).sft.data
    mapped, shown_fmt, notes, skipped = shape_rows("sft", spec, rows, "d.jsonl")
    assert (shown_fmt, notes, skipped) == ("auto", [], [])
    assert detect_format(mapped, "auto") == fmt
    assert to_messages(mapped[0], fmt)[-2:] == [
        {"role": "user", "content": "Greet me"},
        {"role": "assistant", "content": "Hello."},
    ]


def test_dpo_pairs_read_through_columns(tmp_path):
    data = {"question": "2 + 2?", "response_j": "4.", "response_k": "5.", "score": 3}
    rows = read_rows(str(write_jsonl(tmp_path / "d.jsonl", [data])))
    spec = parse(dpo_columns="{prompt: question, chosen: response_j, rejected: response_k}").dpo.data
    mapped, _, _, _ = shape_rows("dpo", spec, rows, "d.jsonl")
    # Renamed, not copied: the old names are gone, other columns stay.
    assert mapped[0].data == {"prompt": "2 + 2?", "chosen": "4.", "rejected": "5.", "score": 3}
    prompt, chosen, rejected = split_preference(mapped[0])
    assert (prompt, chosen["content"], rejected["content"]) == (
        [{"role": "user", "content": "2 + 2?"}],
        "4.",
        "5.",
    )


def test_a_missing_column_names_the_row_the_key_and_the_columns_it_has():
    rows = [Row("data.jsonl:1", {"q": "Hi", "a": "Hello"})]
    with pytest.raises(UserError) as caught:
        map_columns(rows, {"instruction": "q", "output": "answer"}, "sft.data.columns")
    assert str(caught.value) == (
        "data.jsonl:1: column 'answer' (sft.data.columns.output) is missing; the row has: q, a"
    )
    # Only a later row may lack it (JSONL rows need not share keys).
    rows = [Row("data.jsonl:1", {"q": "Hi", "a": "Hello"}), Row("data.jsonl:2", {"q": "Hi"})]
    with pytest.raises(UserError, match=r"^data.jsonl:2: column 'a' \(sft.data.columns.output\) is missing; "
                       r"the row has: q$"):  # fmt: skip
        map_columns(rows, {"instruction": "q", "output": "a"}, "sft.data.columns")


def test_a_mapped_column_shadows_the_fields_own_column_and_says_so():
    rows = [Row("d.jsonl:1", {"prompt": "old", "question": "new", "completion": "c"})]
    mapped, notes = map_columns(rows, {"prompt": "question"}, "sft.data.columns")
    assert mapped[0].data == {"prompt": "new", "completion": "c"}
    assert notes == [
        "sft.data.columns.prompt: reads column 'question'; the data's own 'prompt' column is not used"
    ]


def test_a_swap_swaps():
    rows = [Row("d.jsonl:1", {"prompt": "A", "completion": "Q"})]
    mapped, notes = map_columns(rows, {"prompt": "completion", "completion": "prompt"}, "sft.data.columns")
    assert (mapped[0].data, notes) == ({"prompt": "Q", "completion": "A"}, [])


def test_csv_and_parquet_rows_are_mapped_too(tmp_path):
    import pandas as pd

    frame = pd.DataFrame([{"q": "Greet me", "a": "Hello."}, {"q": "Bye", "a": "Goodbye."}])
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    spec = parse("{instruction: q, output: a}").sft.data
    for name in ("d.csv", "d.parquet"):
        mapped, _, _, _ = shape_rows("sft", spec, read_rows(str(tmp_path / name)), name)
        assert detect_format(mapped, "auto") == "alpaca", name
        assert to_messages(mapped[1], "alpaca")[-1]["content"] == "Goodbye."


def test_validate_maps_train_and_eval_columns_and_a_missing_one_exits_2(tmp_path, tiny_model):
    recipe = write_recipe(tmp_path, tiny_model("llama"))
    for name, n in (("train", 8), ("eval", 4)):
        rows = [{"question": f"What is {i} + 1?", "reply": f"It is {i + 1}.", "prompt": ""} for i in range(n)]
        write_jsonl(tmp_path / "data" / f"{name}.jsonl", rows)
    result = qalign("validate", str(recipe), cwd=tmp_path)
    assert result.returncode == 2 and "cannot tell the data format" in result.stderr
    assert "map columns of other names with sft.data.columns" in result.stderr
    data = yaml.safe_load(recipe.read_text())
    data["sft"]["data"]["columns"] = {"prompt": "question", "completion": "reply"}
    recipe.write_text(yaml.safe_dump(data))
    result = qalign("validate", str(recipe), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "8 of 8 rows kept" in result.stdout and "4 of 4 rows kept" in result.stdout
    # The data's own (empty) prompt column is not read, and that is said once, not once per file.
    note = "sft.data.columns.prompt: reads column 'question'; the data's own 'prompt' column is not used"
    assert " ".join(result.stdout.split()).count(note) == 1

    write_jsonl(tmp_path / "data" / "eval.jsonl", [{"question": "1 + 1?", "answer": "2."}])
    result = qalign("validate", str(recipe), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "eval.jsonl:1: column 'reply' (sft.data.columns.completion) is missing; the row has: question, " \
           "answer" in result.stderr  # fmt: skip


def test_the_readmes_data_snippets_are_valid_recipes(tmp_path):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    blocks = [b.split("```")[0] for b in readme.split("```yaml\n")[1:]]
    snippets = [yaml.safe_load(b) for b in blocks if "columns:" in b or "format: hh_rlhf" in b]
    assert len(snippets) == 2
    for snippet in snippets:
        for stage in snippet.values():
            if Path(stage["data"]["train"]).suffix:
                (tmp_path / stage["data"]["train"]).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / stage["data"]["train"]).touch()
        text = yaml.safe_dump({"name": "t", "model": {"base": "org/model"}, **snippet})
        recipe = parse_recipe(text, tmp_path / "recipe.yaml", [])
        assert any(getattr(recipe, stage).data.columns or getattr(recipe, stage).data.format == "hh_rlhf"
                   for stage in snippet)  # fmt: skip
