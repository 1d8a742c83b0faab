"""HH-RLHF pairs: each side one text with "\\n\\nHuman:" / "\\n\\nAssistant:" turns, recognised by `format: auto`,
split into turns with the shared turns as the prompt; the published dataset's damaged rows are left out,
counted and named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import add_dpo, write_jsonl, write_recipe
from template_zoo import family_tokenizer
from test_cli_sft import qalign
from test_published_templates import trained_runs

from qalign.data import DataReport, Row
from qalign.dpo import prepare_dpo, split_preference
from qalign.errors import UserError
from qalign.hh_rlhf import split_turns
from qalign.recipe_load import parse_recipe
from qalign.sft import prepare_sft
from qalign.stage_data import shape_rows

HISTORY = "\n\nHuman: What is 2 + 3?\n\nAssistant: It is 5.\n\nHuman: And 4 + 4?\n\nAssistant:"
PAIR = {"chosen": HISTORY + " It is 8.", "rejected": HISTORY + " It is 9, I think."}
TURNS = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "It is 5."},
    {"role": "user", "content": "And 4 + 4?"},
]


def data_spec(stage: str, fmt: str = "auto"):
    text = (
        f"name: t\nmodel: {{base: Qwen/Qwen2.5-0.5B}}\n{stage}:\n  data: {{train: org/hh, format: {fmt}}}\n"
    )
    return getattr(parse_recipe(text, Path("recipe.yaml"), []), stage).data


def test_a_text_splits_into_turns():
    # Leading whitespace and the spaces around each turn are not part of it; a newline inside a turn is.
    text = "  \n\nHuman: hi\n\nAssistant: hello\nthere \n\nHuman: more?\n\nAssistant: yes"
    assert split_turns(text, "chosen") == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello\nthere"},
        {"role": "user", "content": "more?"},
        {"role": "assistant", "content": "yes"},
    ]
    assert split_turns("Human: hi\n\nAssistant: hello", "chosen")[0] == {"role": "user", "content": "hi"}


def test_auto_recognises_pairs_and_the_shared_turns_are_the_prompt():
    rows, _, notes, skipped = shape_rows("dpo", data_spec("dpo"), [Row("hh.jsonl:1", PAIR)], "hh.jsonl")
    assert (notes, skipped) == ([], [])
    prompt, chosen, rejected = split_preference(rows[0])
    assert prompt == TURNS
    assert chosen == {"role": "assistant", "content": "It is 8."}
    assert rejected == {"role": "assistant", "content": "It is 9, I think."}


def test_a_pair_trains_exactly_as_the_same_conversations_written_as_messages():
    tokenizer = family_tokenizer("qwen2.5")
    hh, _, _, _ = shape_rows("dpo", data_spec("dpo"), [Row("hh.jsonl:1", PAIR)], "hh.jsonl")
    messages = Row("m.jsonl:1", {
        "chosen": [*TURNS, {"role": "assistant", "content": "It is 8."}],
        "rejected": [*TURNS, {"role": "assistant", "content": "It is 9, I think."}],
    })  # fmt: skip
    (from_hh,), _ = prepare_dpo(hh, tokenizer, 512, "drop", "hh.jsonl")
    (from_messages,), _ = prepare_dpo([messages], tokenizer, 512, "drop", "m.jsonl")
    assert (
        from_hh.chosen_ids == from_messages.chosen_ids
        and from_hh.rejected_labels == from_messages.rejected_labels
    )
    trained = [t for t, label in zip(from_hh.chosen_ids, from_hh.chosen_labels, strict=True) if label != -100]
    assert tokenizer.decode(trained) == "It is 8.<|im_end|>"  # only the final reply, never the earlier one


DAMAGED = {
    "empty final turn": ({"chosen": HISTORY, "rejected": PAIR["rejected"]}, "its final Assistant turn in 'chosen' is empty"),
    "empty turn": ({"chosen": "\n\nHuman: \n\nAssistant: Hi.", "rejected": "\n\nHuman: \n\nAssistant: Yo."},
                   "a Human turn in 'chosen' is empty"),
    "same": ({"chosen": PAIR["chosen"], "rejected": PAIR["chosen"]}, "chosen and rejected are the same"),
    "earlier turns differ": ({"chosen": PAIR["chosen"], "rejected": PAIR["rejected"].replace("5.", "6.")},
                             "chosen and rejected differ before their final Assistant turn"),
    "two human turns": ({"chosen": "\n\nHuman: a\n\nHuman: b\n\nAssistant: c", "rejected": PAIR["rejected"]},
                        "two Human turns in a row in 'chosen'"),
    "ends with human": ({"chosen": PAIR["chosen"], "rejected": PAIR["rejected"] + "\n\nHuman: ok?"},
                        "'rejected' ends with a Human turn, not an Assistant reply"),
}  # fmt: skip


def test_damaged_rows_are_left_out_with_their_reason_and_named():
    rows = [Row("hh.jsonl:1", PAIR)] + [
        Row(f"hh.jsonl:{i}", data) for i, (data, _) in enumerate(DAMAGED.values(), 2)
    ]
    kept, _, _, skipped = shape_rows("dpo", data_spec("dpo"), rows, "hh.jsonl")
    assert [row.where for row in kept] == ["hh.jsonl:1"]
    assert skipped == [(why, f"hh.jsonl:{i}") for i, (_, why) in enumerate(DAMAGED.values(), 2)]
    report = DataReport("hh.jsonl", rows=len(rows), skipped=[*skipped, skipped[2]])
    lines = report.warnings("dpo")
    assert (
        "hh.jsonl: left out 2 of 7 rows: chosen and rejected are the same (hh.jsonl:4, hh.jsonl:4)" in lines
    )
    assert "hh.jsonl: left out 1 of 7 rows: a Human turn in 'chosen' is empty (hh.jsonl:3)" in lines
    with pytest.raises(
        UserError, match=r"^hh.jsonl: all 1 rows are left out; the first, hh.jsonl:2: its final"
    ):
        shape_rows("dpo", data_spec("dpo"), rows[1:2], "hh.jsonl")


def test_the_explicit_format_refuses_a_row_that_is_not_hh():
    rows = [Row("hh.jsonl:1", PAIR), Row("hh.jsonl:2", {"chosen": "Sure.", "rejected": "No."})]
    with pytest.raises(UserError, match=r"^hh.jsonl:2: 'chosen' is not an HH-RLHF text \(one string starting "
                       r"with 'Human:', got str\); dpo.data.format is hh_rlhf"):  # fmt: skip
        shape_rows("dpo", data_spec("dpo"), rows, "hh.jsonl")
    # Other layouts are not touched by auto; with hh_rlhf named, a row of them is the error.
    plain = [Row("p.jsonl:1", {"prompt": "Hi", "chosen": "\n\nHuman: x", "rejected": "No."})]
    assert shape_rows("dpo", data_spec("dpo"), plain, "p.jsonl")[0] == plain
    with pytest.raises(UserError, match=r"'rejected' is not an HH-RLHF text"):
        shape_rows("dpo", data_spec("dpo", "hh_rlhf"), plain, "p.jsonl")
    # And HH texts read as another format say which format they are.
    for stage, fmt in (("dpo", "preference"), ("sft", "messages")):
        with pytest.raises(UserError, match=rf"^hh.jsonl:1: 'chosen' is an HH-RLHF text .* but {stage}.data.format "
                           rf"is {fmt}; set it to hh_rlhf or auto$"):  # fmt: skip
            shape_rows(stage, data_spec(stage, fmt), rows[:1], "hh.jsonl")


def test_sft_trains_the_chosen_conversation():
    tokenizer = family_tokenizer("qwen2.5")
    rows, fmt, _, _ = shape_rows("sft", data_spec("sft"), [Row("hh.jsonl:1", PAIR)], "hh.jsonl")
    (example,), _ = prepare_sft(rows, fmt, tokenizer, 512, "drop", "hh.jsonl")
    # Every Assistant turn of the chosen side, the earlier one too; the rejected side is not read.
    assert trained_runs(tokenizer, example.input_ids, example.labels) == [
        "It is 5.<|im_end|>",
        "It is 8.<|im_end|>",
    ]


def test_validate_reports_the_rows_left_out(tmp_path, tiny_model):
    recipe = add_dpo(write_recipe(tmp_path, tiny_model("llama")))
    write_jsonl(tmp_path / "data" / "dpo.jsonl", [PAIR, DAMAGED["empty final turn"][0], PAIR])
    data = yaml.safe_load(recipe.read_text())
    data["dpo"]["data"]["eval"] = None
    data["dpo"]["max_length"] = 256
    recipe.write_text(yaml.safe_dump(data))
    result = qalign("validate", str(recipe), "--stage", "dpo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    output = " ".join((result.stdout + result.stderr).split())
    assert "2 of 3 rows kept" in output
    assert (
        "left out 1 of 3 rows: its final Assistant turn in 'chosen' is empty ("
        + str(tmp_path / "data" / "dpo.jsonl")
        + ":2)"
        in output
    )
