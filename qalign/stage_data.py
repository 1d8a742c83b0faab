"""A stage's data: read, rendered and checked row by row before any training, and reported."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from qalign.data import FORMAT_KEYS, DataReport, Row, read_rows
from qalign.errors import UserError
from qalign.progress import Progress
from qalign.recipe import DataSpec, Recipe, TrainSpec


@dataclass
class StageData:
    train: list
    eval: list | None

    @property
    def digest(self) -> str:
        """Identifies the tokenized rows (so also the template, max_length and truncation they went through)."""
        return examples_hash(self.train) + examples_hash(self.eval or [])


def examples_hash(examples: list) -> str:
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps(example.__dict__ | {"reference": None, "where": None}).encode())
    return digest.hexdigest()[:16]


def describe_report(report: DataReport) -> str:
    p = report.percentiles()
    lengths = ", ".join(f"{k} {v}" for k, v in p.items())
    apart = f" (and {report.turns_apart} rows for turns trained apart)" if report.turns_apart else ""
    labels = f" ({report.label_counts})" if hasattr(report, "label_counts") else ""  # KTO's KtoReport
    return (
        f"{report.source}: {report.kept} of {report.rows} rows kept{labels}{apart}, "
        f"{report.trained_tokens:,} trained tokens; lengths {lengths}"
    )


def shape_rows(
    name: str, data: DataSpec, rows: list[Row], source: str
) -> tuple[list[Row], str, list[str], list[tuple[str, str]]]:
    """The rows as the stage's formats read them: `data.columns` applied, HH-RLHF texts split into turns.
    Returns (rows, the format for prepare_sft, notes on shadowed columns, (why, where) of rows left out)."""
    from qalign.columns import map_columns
    from qalign.hh_rlhf import convert, looks_like_hh

    rows, notes = map_columns(rows, data.columns, f"{name}.data.columns")
    fmt = data.format
    if fmt == "hh_rlhf" or (fmt == "auto" and looks_like_hh(rows[0], name)):
        rows, skipped = convert(rows, name, f"{name}.data.format")
        if not rows:
            why, where = skipped[0]
            raise UserError(f"{source}: all {len(skipped)} rows are left out; the first, {where}: {why}")
        return rows, "messages", notes, skipped
    # Only when the row lacks what the named format reads (string pairs read a prompt).
    needs = FORMAT_KEYS.get(fmt, ("prompt",))
    if fmt != "auto" and looks_like_hh(rows[0], name) and not all(k in rows[0].data for k in needs):
        raise UserError(
            f"{rows[0].where}: 'chosen' is an HH-RLHF text (turns marked Human: / Assistant:) but "
            f"{name}.data.format is {fmt}; set it to hh_rlhf or auto"
        )
    return rows, fmt, notes, []


def load_stage_data(recipe: Recipe, name: str, tokenizer: object, progress: Progress) -> StageData:
    """The `name` stage's train and eval examples, every row checked; the reports printed."""
    spec: TrainSpec | None = getattr(recipe, name)
    if spec is None:
        raise UserError(f"{recipe.source}: the recipe has no '{name}' section")

    notes: set[str] = set()

    def prepare(source: str, split: str, training: bool = True) -> tuple[list, DataReport]:
        rows, fmt, shadowed, skipped = shape_rows(name, spec.data, read_rows(source, split), source)
        for note in sorted(set(shadowed) - notes):
            progress.info(note)
        notes.update(shadowed)
        if name == "sft":
            from qalign.sft import prepare_sft

            examples, report = prepare_sft(rows, fmt, tokenizer, spec.max_length, spec.overlong, source)
        else:
            from qalign.kto import is_unpaired, prepare_kto

            if is_unpaired(rows, spec, recipe.source):
                weights = (spec.desirable_weight, spec.undesirable_weight) if training else None
                examples, report = prepare_kto(
                    rows, tokenizer, spec.max_length, spec.overlong, source, weights
                )
            else:
                from qalign.dpo import prepare_dpo

                examples, report = prepare_dpo(rows, tokenizer, spec.max_length, spec.overlong, source)
        report.rows += len(skipped)
        report.skipped = skipped
        return examples, report

    from qalign.chat_template import describe_template

    progress.info(describe_template(tokenizer))
    train, report = prepare(spec.data.train, spec.data.train_split)
    reports = [report]
    evals = None
    if spec.data.eval is not None:
        evals, eval_report = prepare(spec.data.eval, spec.data.eval_split, training=False)
        reports.append(eval_report)
    for item in reports:
        progress.info(describe_report(item))
        for line in item.warnings(name):
            progress.warn(line)
    if not train:
        raise UserError(
            f"{spec.data.train}: every row is longer than {name}.max_length={spec.max_length}; "
            f"raise it or set {name}.overlong: truncate"
        )
    return StageData(train, evals)


def planned_lengths(recipe: Recipe, name: str, progress: Progress) -> object:
    """`qalign plan`'s view of the data: its lengths, or a note on why the plan takes max_length instead."""
    from qalign.memory import Lengths, lengths_of
    from qalign.model import load_tokenizer
    from qalign.model_shapes import reads_disk_only

    # As with the config, only a tokenizer already on disk is used for an id the table knows, so an offline plan
    # answers at once instead of waiting out the hub client's retries.
    disk_only = reads_disk_only(recipe.model)
    try:
        tokenizer = load_tokenizer(recipe.model, progress.warn, local_files_only=disk_only)
    except UserError as exc:
        if disk_only:
            why = f"the tokenizer of {recipe.model.base} is not on disk, so the data was not read"
        else:
            why = f"the data could not be read ({exc})"
        return Lengths(note=f"max_length: {why}")
    try:
        data = load_stage_data(recipe, name, tokenizer, progress)
    except UserError as exc:
        return Lengths(note=f"max_length: the data could not be read ({exc})")
    return lengths_of(data.train, name)
