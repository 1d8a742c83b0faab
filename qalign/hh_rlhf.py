"""Anthropic's HH-RLHF layout: each side of a pair is one text, its turns marked "\\n\\nHuman:" and
"\\n\\nAssistant:". Split into messages, a pair becomes two whole conversations whose shared turns are the
prompt (the layout `dpo.split_preference` already reads), and an SFT row becomes its `chosen` conversation.

The published dataset has rows no conversation can be made of: an empty turn, a final Assistant turn with
nothing in it, two turns of one speaker in a row, sides that differ before their last turn, or chosen equal to
rejected. Those rows are left out, each with its reason, and counted in the stage's report; a text that is not
in this layout at all is an error.
"""

from __future__ import annotations

import re

from qalign.data import Row
from qalign.errors import UserError

MARKER = re.compile(r"\n\n(Human|Assistant):")
ROLES = {"Human": "user", "Assistant": "assistant"}


class Skipped(Exception):
    """A row of the dataset's known kinds of damage: left out and counted, not an error."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


def is_hh_text(value: object) -> bool:
    return isinstance(value, str) and value.lstrip().startswith("Human:")


def looks_like_hh(row: Row, stage: str) -> bool:
    """`format: auto`'s test: chosen is an HH text and the row has no prompt (for DPO, rejected is a text)."""
    data = row.data
    if not is_hh_text(data.get("chosen")) or "prompt" in data:
        return False
    return isinstance(data.get("rejected"), str) if stage == "dpo" else True


def split_turns(text: str, key: str) -> list[dict]:
    """One HH text as user/assistant messages, each turn's text stripped of the spaces around it."""
    parts = MARKER.split("\n\n" + text.lstrip())
    messages = [
        {"role": ROLES[speaker], "content": body.strip()}
        for speaker, body in zip(parts[1::2], parts[2::2], strict=True)
    ]
    for i, message in enumerate(messages):
        if i and message["role"] == messages[i - 1]["role"]:
            raise Skipped(f"two {_speaker(message)} turns in a row in '{key}'")
        if not message["content"]:
            speaker = _speaker(message)
            which = "its final" if i == len(messages) - 1 else ("an" if speaker == "Assistant" else "a")
            raise Skipped(f"{which} {speaker} turn in '{key}' is empty")
    if messages[-1]["role"] != "assistant":
        raise Skipped(f"'{key}' ends with a Human turn, not an Assistant reply")
    return messages


def _speaker(message: dict) -> str:
    return "Human" if message["role"] == "user" else "Assistant"


def convert(rows: list[Row], stage: str, key: str) -> tuple[list[Row], list[tuple[str, str]]]:
    """The rows as DPO's two-conversation pairs (stage "dpo") or as messages rows of their chosen side (SFT),
    and (why, where) for each row left out. `key` names the format setting for errors."""
    out, skipped = [], []
    for row in rows:
        data = row.data
        sides = ("chosen", "rejected") if stage == "dpo" else ("chosen",)
        for side in sides:
            if not is_hh_text(data.get(side)):
                got = type(data.get(side)).__name__ if side in data else "nothing"
                raise UserError(
                    f"{row.where}: '{side}' is not an HH-RLHF text (one string starting with 'Human:', got "
                    f"{got}); {key} is hh_rlhf for this data: set it to the data's format"
                )
        try:
            turns = [split_turns(data[side], side) for side in sides]
            if stage == "dpo":
                chosen, rejected = turns
                if chosen == rejected:
                    raise Skipped("chosen and rejected are the same")
                if chosen[:-1] != rejected[:-1]:
                    raise Skipped("chosen and rejected differ before their final Assistant turn")
        except Skipped as skip:
            skipped.append((skip.why, row.where))
            continue
        rest = {k: v for k, v in data.items() if k not in ("chosen", "rejected")}
        if stage == "dpo":
            out.append(Row(row.where, {**rest, "chosen": turns[0], "rejected": turns[1]}))
        else:
            out.append(Row(row.where, {**rest, "messages": turns[0]}))
    return out, skipped
