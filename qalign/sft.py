"""Supervised fine-tuning: examples are rendered conversations, the loss is NLL on assistant tokens only."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from qalign.chat_template import IGNORE, render_rows
from qalign.conversation import to_conversation
from qalign.data import DataReport, Row, detect_format, pad
from qalign.errors import UserError
from qalign.logprobs import label_logprobs
from qalign.losses import sft_loss
from qalign.packing import check_model, forward_kwargs
from qalign.template_text import ignores_tools
from qalign.train import Stage


@dataclass
class SftExample:
    input_ids: list[int]
    labels: list[int]
    where: str

    @property
    def weight(self) -> int:
        """Trained tokens: what a step's loss is averaged over."""
        return sum(1 for label in self.labels[1:] if label != IGNORE)


def prepare_sft(
    rows: list[Row],
    fmt: str,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    overlong: str,
    source: str,
    format_key: str = "sft.data.format",
) -> tuple[list[SftExample], DataReport]:
    """Validate, render and tokenize every row; every problem stops here, before any training."""
    fmt = detect_format(rows, fmt, format_key)
    report = DataReport(source=source, rows=len(rows), lengths=[])
    examples = []
    kept = 0
    for row in rows:
        conversation = to_conversation(row, fmt)
        try:
            rendered_rows = render_rows(
                tokenizer, conversation.messages, conversation.trained_from, conversation.tools
            )
            report.tools_ignored += ignores_tools(tokenizer, conversation.messages, conversation.tools)
        except UserError as exc:
            raise UserError(f"{row.where}: {exc}") from None
        if all(label == IGNORE for rendered in rendered_rows for label in rendered.labels[1:]):
            raise UserError(
                f"{row.where}: no token to train on after rendering through the chat template "
                "(does the template print assistant turns?)"
            )
        report.turns_apart += len(rendered_rows) - 1
        for rendered in rendered_rows:
            report.eos_appended += rendered.eos_appended
            report.turns_unmasked += rendered.turns_unmasked
            report.unanswered_opening += rendered.unanswered_opening
            report.inexact_prompts += rendered.inexact_prompt
        # A row's own example first; then its turns trained apart, named by the turn.
        wheres = [row.where, *(f"{row.where} (turn {turn})" for turn in rendered_rows[0].apart)]
        for rendered, where in zip(rendered_rows, wheres, strict=True):
            example = _fit(rendered.input_ids, rendered.labels, where, max_length, overlong, report)
            if example is None:
                continue
            kept += where == row.where
            examples.append(example)
            report.lengths.append(len(example.input_ids))
            report.trained_tokens += example.weight
    report.kept = kept
    return examples, report


def _fit(
    ids: list[int], labels: list[int], where: str, max_length: int, overlong: str, report: DataReport
) -> SftExample | None:
    """The example within max_length (dropped or truncated as the recipe says, and counted)."""
    if len(ids) > max_length:
        if overlong == "drop":
            report.dropped_overlong += 1
            return None
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE for label in labels[1:]):
            report.dropped_overlong += 1
            return None
        report.truncated += 1
    return SftExample(ids, labels, where)


def collate_sft(examples: list[SftExample], pad_id: int) -> dict[str, torch.Tensor]:
    ids = [e.input_ids for e in examples]
    return {
        "input_ids": torch.tensor(pad(ids, pad_id)),
        "attention_mask": torch.tensor(pad([[1] * len(i) for i in ids], 0)),
        "labels": torch.tensor(pad([e.labels for e in examples], IGNORE)),
    }


def collate_sft_packed(examples: list[SftExample]) -> dict[str, torch.Tensor]:
    """The examples end to end in one row, no padding: positions restart at each example, `ends` says where
    each one stops (the attention stays inside it, see packing.py), and each example's first token is never a
    target (nothing of its own precedes it), as in its own padded row."""
    ids, labels, positions, ends = [], [], [], []
    for e in examples:
        ids += e.input_ids
        labels += [IGNORE, *e.labels[1:]]
        positions += range(len(e.input_ids))
        ends.append(len(ids))
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([positions]),
        "ends": torch.tensor(ends),
    }


def sft_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], norm: int) -> tuple[torch.Tensor, dict]:
    """This micro-batch's share of the step loss (already divided by the step's trained-token count)."""
    packed = forward_kwargs(batch["ends"].tolist()) if "ends" in batch else None
    logps, _ = label_logprobs(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        batch["labels"],
        batch.get("position_ids"),
        packed,
    )
    loss = sft_loss(logps, norm)
    return loss, {"loss": loss.detach()}


def make_stage(context: object) -> Stage:
    """The SFT stage: each example weighs its trained tokens, so a step's loss is the mean over them."""
    pad_id = context.tokenizer.pad_token_id
    packing = context.spec.packing is True
    longest = max((len(e.input_ids) for e in [*context.data.train, *(context.data.eval or [])]), default=0)
    check_model(context.model.config, "sft", packing, longest)
    return Stage(
        name="sft",
        spec=context.spec,
        train=context.data.train,
        eval=context.data.eval,
        collate=lambda examples: collate_sft_packed(examples) if packing else collate_sft(examples, pad_id),
        step_loss=sft_step,
        weight=lambda example: example.weight,
    )
