"""The qalign side of a measurement: a generated recipe run through qalign's own stage runner (what `qalign sft`
and `qalign dpo` call), with a clock on each optimizer step and on the reference precompute pass."""

from __future__ import annotations

import argparse
import io
import time
from types import SimpleNamespace

import yaml
from bench_levers import apply_levers
from bench_worker import LORA, StepClock, qalign_settings
from rich.console import Console


def write_recipe(args: argparse.Namespace) -> dict:
    section = {
        "data": {"train": str(args.data / f"{args.stage}.jsonl")},
        "max_length": args.max_length,
        "max_steps": args.steps,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "lr": args.lr,
        "scheduler": "linear",
        "warmup_ratio": 0.0,
        "max_grad_norm": 1.0,
        # Only the final checkpoint, written after the last timed step.
        "save_every": 0,
        "save_total_limit": 1,
        "log_every": 1,
        **qalign_settings(args.stage, args.mode),
    }
    recipe = {
        "name": "bench",
        "output_dir": str(args.workdir / "run"),
        "seed": 0,
        "model": {
            "base": str(args.model),
            "quantization": "nf4",
            "double_quant": True,
            "compute_dtype": "auto",
        },
        "lora": {**LORA, "target_modules": "all-linear"},
        args.stage: section,
    }
    path = args.workdir / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return recipe


def run_qalign(args: argparse.Namespace, clock: StepClock) -> dict:
    with clock.phase("qalign imports"):
        from qalign import reference, runner
        from qalign.model import compute_dtype, pick_device
        from qalign.progress import Progress
        from qalign.recipe_load import load_recipe
        from qalign.train import Trainer

    with clock.phase("recipe"):
        recipe_dict = write_recipe(args)
        recipe = load_recipe(args.workdir / "recipe.yaml", args.overrides)
    apply_levers(args.lever)

    original_step = Trainer._train_step

    def timed_step(self: Trainer) -> dict:
        examples = [e for batch in self.micro_batches(self.step) for e in batch]
        tokens = sum(
            len(e.chosen_ids) + len(e.rejected_ids) if hasattr(e, "chosen_ids") else len(e.input_ids)
            for e in examples
        )
        clock.training_begins()
        record = original_step(self)
        clock.step_done(tokens)
        return record

    original_reference = reference.compute_reference

    def timed_reference(*a, **k):
        began = time.perf_counter()
        try:
            return original_reference(*a, **k)
        finally:
            clock.precompute_s += time.perf_counter() - began

    # The start-up stages run_stage goes through before training (it calls them by these module names); the
    # reference pass is clock.precompute_s.
    for name, phase in (
        ("load_tokenizer", "tokenizer"),
        ("load_stage_data", "data (read, render, check)"),
        ("plan_memory", "memory plan"),
        ("load_model", "model (load, quantize, LoRA)"),
    ):
        setattr(runner, name, clock.timed(phase, getattr(runner, name)))
    Trainer._train_step = timed_step
    reference.compute_reference = timed_reference
    quiet = Console(file=io.StringIO())
    runner.run_stage(
        recipe, args.stage, Progress(quiet, quiet), runner.RunOptions(resume=False, overwrite=True)
    )
    # The recipe written beside the outputs has the `auto` settings as the run resolved them.
    resolved = yaml.safe_load((recipe.out / args.stage / "recipe.yaml").read_text(encoding="utf-8"))
    spec = SimpleNamespace(**resolved[args.stage])
    settings = {
        "gradient_checkpointing": spec.gradient_checkpointing,
        "packing": spec.packing,
        "compute_dtype": f"{recipe.model.compute_dtype} ({str(compute_dtype(recipe.model.compute_dtype, pick_device())).removeprefix('torch.')})",
        "lora_dropout": recipe_dict["lora"]["dropout"]
        if args.stage == "sft"
        else "0 (qalign turns dropout off in DPO)",
    }
    if args.stage == "dpo":
        settings["reference"] = spec.reference
    return settings
