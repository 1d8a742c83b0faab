"""Showing data the way the model sees it: a rendered example with its trained tokens highlighted, and a dump
of every tokenized row for inspection."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.panel import Panel
from rich.text import Text
from transformers import PreTrainedTokenizerBase

from qalign.atomic import atomic_write_text
from qalign.chat_template import IGNORE


def show_example(console: Console, tokenizer: PreTrainedTokenizerBase, example: object) -> None:
    """Trained tokens in bold green, the rest dim, decoded run by run so multi-byte characters stay whole."""
    text = Text()
    ids, labels = example.input_ids, example.labels
    start = 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or (labels[end] != IGNORE) != (labels[start] != IGNORE):
            piece = tokenizer.decode(ids[start:end])
            text.append(piece, style="bold green" if labels[start] != IGNORE else "dim")
            start = end
    title = f"{example.where}  ([bold green]trained[/bold green] / [dim]context[/dim])"
    console.print(Panel(text, title=title, title_align="left"))


def dump_record(example: object) -> dict:
    if hasattr(example, "desirable"):  # a KTO row: its completion and the KL estimate's mismatched one
        prompt = example.prompt_ids
        return {
            "prompt_ids": prompt,
            "completion_ids": example.chosen_ids[len(prompt) :],
            "label": example.desirable,
            "kl_completion_ids": example.rejected_ids[len(prompt) :],
        }
    if hasattr(example, "chosen_ids"):  # a preference pair: the shared prompt, then each response
        prompt = example.prompt_ids
        return {
            "prompt_ids": prompt,
            "chosen_ids": example.chosen_ids[len(prompt) :],
            "rejected_ids": example.rejected_ids[len(prompt) :],
        }
    return {"input_ids": example.input_ids, "labels": example.labels}


def write_dump(path: Path, examples: list) -> None:
    lines = (json.dumps(dump_record(e)) for e in examples)
    atomic_write_text(path, "".join(line + "\n" for line in lines))
