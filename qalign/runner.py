"""Running a stage end to end: check the output folder, load data and model, train, save the adapter."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from transformers import set_seed

from qalign import __version__
from qalign.checkpoint import CheckpointManager, atomic_write_text
from qalign.data import DataReport, read_rows
from qalign.errors import UserError
from qalign.model import (
    attach_lora,
    compute_dtype,
    count_parameters,
    footprint_bytes,
    load_base,
    load_tokenizer,
    pick_device,
)
from qalign.progress import Progress
from qalign.recipe import Recipe
from qalign.sft import collate_sft, prepare_sft, sft_step
from qalign.train import Stage, Trainer, total_steps

RUN_MARKER = ".qalign-run"


def check_output_dir(recipe: Recipe) -> None:
    """Refuse to write into a folder that holds something other than a qalign run."""
    out = recipe.out
    if out.exists() and not out.is_dir():
        raise UserError(f"{recipe.source}: output_dir {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / RUN_MARKER).exists():
        raise UserError(
            f"{recipe.source}: output_dir {out} already holds files that are not a qalign run; "
            "choose another output_dir"
        )
    out.mkdir(parents=True, exist_ok=True)
    if not (out / RUN_MARKER).exists():
        atomic_write_text(out / RUN_MARKER, json.dumps({"qalign": __version__, "name": recipe.name}) + "\n")


def examples_hash(examples: list) -> str:
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([example.input_ids, example.labels]).encode())
    return digest.hexdigest()[:16]


def describe_report(report: DataReport) -> str:
    p = report.percentiles()
    lengths = ", ".join(f"{k} {v}" for k, v in p.items())
    return (
        f"{report.source}: {report.kept} of {report.rows} rows kept, "
        f"{report.trained_tokens:,} trained tokens; "
        f"lengths {lengths}"
    )


def load_sft_data(recipe: Recipe, tokenizer: object, progress: Progress) -> tuple[list, list | None, list]:
    """(train examples, eval examples or None, reports) for the recipe's sft section."""
    spec = recipe.sft
    assert spec is not None
    reports = []
    train, report = prepare_sft(
        read_rows(spec.data.train, spec.data.train_split),
        spec.data.format,
        tokenizer,
        spec.max_length,
        spec.overlong,
        spec.data.train,
    )
    reports.append(report)
    evals = None
    if spec.data.eval is not None:
        evals, eval_report = prepare_sft(
            read_rows(spec.data.eval, spec.data.eval_split),
            spec.data.format,
            tokenizer,
            spec.max_length,
            spec.overlong,
            spec.data.eval,
        )
        reports.append(eval_report)
    for item in reports:
        progress.info(describe_report(item))
        for line in item.warnings("sft"):
            progress.warn(line)
    if not train:
        raise UserError(
            f"{spec.data.train}: every row is longer than sft.max_length={spec.max_length}; "
            "raise it or set sft.overlong: truncate"
        )
    return train, evals, reports


def run_sft(recipe: Recipe, progress: Progress, resume: bool = True, overwrite: bool = False) -> Path:
    """`qalign sft`: returns the adapter folder."""
    if recipe.sft is None:
        raise UserError(f"{recipe.source}: the recipe has no 'sft' section")
    spec = recipe.sft
    check_output_dir(recipe)
    stage_dir = recipe.out / "sft"
    adapter_dir = stage_dir / "adapter"
    if not resume:
        _start_over(stage_dir)

    tokenizer = load_tokenizer(recipe.model, progress.warn)
    train, evals, _ = load_sft_data(recipe, tokenizer, progress)

    if adapter_dir.exists() and not overwrite:
        if resume and _finished(stage_dir, total_steps(spec, len(train))[0]):
            progress.info(
                f"sft is already complete: {adapter_dir} (pass --no-resume --overwrite to train again)"
            )
            return adapter_dir
        raise UserError(f"{adapter_dir} already holds a finished adapter; pass --overwrite to replace it")

    # Seeded before the adapter exists: LoRA's initial weights come from the global RNG.
    set_seed(recipe.seed)
    device = pick_device()
    dtype = compute_dtype(recipe.model.compute_dtype, device)
    base = load_base(recipe.model, device)
    progress.info(
        f"base {recipe.model.base}: {footprint_bytes(base) / 2**20:,.1f} MiB in memory "
        f"({recipe.model.quantization}, compute {str(dtype).removeprefix('torch.')}, {device.type})"
    )
    model = attach_lora(base, recipe.lora, spec.gradient_checkpointing)
    trainable, total = count_parameters(model)
    progress.info(
        f"LoRA r={recipe.lora.r}: {trainable:,} trainable of {total:,} parameters ({trainable / total:.3%})"
    )

    pad_id = tokenizer.pad_token_id
    stage = Stage(
        name="sft",
        spec=spec,
        train=train,
        eval=evals,
        collate=lambda examples: collate_sft(examples, pad_id),
        step_loss=sft_step,
        weight=lambda example: example.weight,
        data_hash=examples_hash(train) + examples_hash(evals or []),
    )
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
    trainer = Trainer(stage, model, tokenizer, stage_dir, recipe.seed, precision, progress, recipe.to_yaml())
    trainer.fit(resume)
    trainer.save_adapter(adapter_dir, overwrite=True)
    trainer.log_final({"adapter": str(adapter_dir)})
    progress.info(f"adapter saved to {adapter_dir}")
    return adapter_dir


def _finished(stage_dir: Path, total: int) -> bool:
    latest = CheckpointManager(stage_dir / "checkpoints").latest()
    return latest is not None and CheckpointManager.read_state(latest).get("step") == total


def _start_over(stage_dir: Path) -> None:
    """--no-resume: forget checkpoints and metrics of the earlier attempt (never the finished adapter)."""
    for name in ("checkpoints", "metrics.jsonl"):
        path = stage_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
