"""The benchmark's table on the terminal and benchmarks/RESULTS.md, built from the measured medians only."""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import shlex
from pathlib import Path

from bench_levers import LEVERS
from rich.table import Table

# Dense bf16 peak TFLOP/s by GPU name, for model FLOPs utilization; --peak-tflops overrides.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "4090": 165.0,
    "3090": 71.0,
}
# The targets on a 2-core CPU: (stage, mode, minimum qalign/TRL tokens/s); peak memory no higher.
TARGETS = [
    ("dpo", "defaults", 2.5),
    ("dpo", "gc-on", 1.5),
    ("dpo", "gc-off", 1.5),
    ("sft", "gc-on", 1.3),
    ("sft", "gc-off", 1.3),
]
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "trl", "datasets")
LEVER_TEXT = {
    **LEVERS,
    "precompute-reference": "reference log-probs precomputed once per dataset (off: dpo.reference=live, every step)",
    "gradient-checkpointing": "gradient checkpointing (off: gc-off); a memory lever, not a speed one",
    "compute-dtype": "compute dtype auto, bf16 on this CPU (off: model.compute_dtype=fp32)",
}


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "os": platform.platform(),
    }
    import torch

    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    for name in PACKAGES:
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = "not installed"
    return info


def _mib(entry: dict) -> str:
    value = entry.get("train_mib")
    return "n/a" if value is None or value != value else f"{value:,.0f}"


def _ratio(ours: dict, theirs: dict) -> str:
    a, b = ours.get("train_mib"), theirs.get("train_mib")
    if a is None or b is None or a != a or b != b or b <= 0:
        return "n/a"
    return f"{a / b:.2f}x"


def mfu(entry: dict, model: dict, args: argparse.Namespace) -> float | None:
    """Model FLOPs utilization by the 6N-per-token convention (N: parameters without the input embeddings)."""
    if entry["device"] != "cuda":
        return None
    peak = args.peak_tflops
    if peak is None:
        name = machine().get("gpu", "")
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    if not peak:
        return None
    return entry["tokens_per_s_train"] * 6 * model["non_embedding"] / (peak * 1e12)


def comparisons(summary: dict, args: argparse.Namespace) -> list[dict]:
    """qalign and TRL side by side per (stage, mode), matched-settings modes first: they compare like with like,
    where `defaults` also compares the tools' choices."""
    rows = []
    modes = sorted(args.modes, key=lambda mode: mode == "defaults")
    for stage in args.stages:
        for mode in modes:
            ours, theirs = summary.get(("qalign", stage, mode)), summary.get(("trl", stage, mode))
            if ours and theirs:
                rows.append({"stage": stage, "mode": mode, "qalign": ours, "trl": theirs})
    return rows


def lever_rows(summary: dict, args: argparse.Namespace) -> list[dict]:
    rows = []
    for (kind, name, stage), entry in summary.items():
        base = summary.get(("qalign", stage, "gc-on"))
        if kind == "lever" and base:
            rows.append({"lever": name, "stage": stage, "on": base, "off": entry})
    for stage in args.stages:
        on, off = summary.get(("qalign", stage, "gc-on")), summary.get(("qalign", stage, "gc-off"))
        if on and off:
            rows.append({"lever": "gradient-checkpointing", "stage": stage, "on": on, "off": off})
    return rows


def results_table(summary: dict, args: argparse.Namespace, model: dict) -> Table:
    table = Table(title=f"qalign vs TRL, {model['name']} model, medians of {args.reps}")
    for column in (
        "stage",
        "mode",
        "tool",
        "tokens/s",
        "train-only tok/s",
        "peak MiB",
        "speed ratio",
        "memory ratio",
    ):
        table.add_column(column, justify="left" if column in ("stage", "mode", "tool") else "right")
    for row in comparisons(summary, args):
        ours, theirs = row["qalign"], row["trl"]
        for tool, entry in (("qalign", ours), ("trl", theirs)):
            ratio = tool == "qalign"
            table.add_row(
                row["stage"],
                row["mode"],
                tool,
                f"{entry['tokens_per_s']:,.0f}",
                f"{entry['tokens_per_s_train']:,.0f}",
                f"{entry['peak_mib']:,.0f}",
                f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x" if ratio else "",
                f"{ours['peak_mib'] / theirs['peak_mib']:.2f}x" if ratio else "",
            )
    return table


def render_results(summary: dict, args: argparse.Namespace, model: dict, argv: list[str]) -> str:
    info = machine()
    rows = comparisons(summary, args)
    device = next(iter(summary.values()))["device"]
    memory = next(iter(summary.values()))["memory"]
    # bench_qalign reports e.g. "auto (bfloat16)"; both tools run in that dtype.
    resolved = rows[0]["qalign"]["settings"].get("compute_dtype", "?") if rows else "?"
    dtype = resolved[resolved.find("(") + 1 : -1] if "(" in resolved else resolved
    lines = [
        "# qalign vs TRL: throughput and peak memory",
        "",
        "Written by `benchmarks/bench.py` (`make bench`); every number below comes from the run it describes.",
        "",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Command: `{shlex.join(['python', 'benchmarks/bench.py', *argv[1:]])}`",
        f"- Machine: {info['cpu']}" + (f"; GPU {info['gpu']}" if "gpu" in info else "; no GPU"),
        f"- Python {info['python']}, " + ", ".join(f"{name} {info[name]}" for name in PACKAGES),
        f"- Model: random-weight {model['architecture']} `{model['name']}`, {model['parameters'] / 1e6:.1f}M "
        f"parameters ({model['non_embedding'] / 1e6:.1f}M without the input embeddings), NF4 4-bit with double "
        f"quantization, compute in {dtype} for both tools (what qalign's `compute_dtype: auto` picks here: bf16 "
        "on a GPU or CPU that multiplies bf16 natively, else fp32); LoRA r=16, alpha 32, on every linear layer but "
        "the LM head",
        f"- Workload: {args.steps} optimizer steps of batch {args.batch_size} x grad_accum {args.grad_accum}, "
        f"AdamW (torch), lr 1e-4, linear schedule; one epoch of generated data, every example "
        f"{rows[0]['qalign']['step_tokens'] // (args.batch_size * args.grad_accum * (2 if rows[0]['stage'] == 'dpo' else 1)) if rows else '?'}"
        " tokens (prompt + response, ChatML); DPO pairs share the prompt",
        f"- Repetitions: {args.reps}, tools alternating which goes first, every measurement in its own process; "
        "medians",
        "",
        "**tokens/s** counts the non-padding input tokens (prompt and response; chosen and rejected both in DPO) of "
        f"the optimizer steps after the first {args.warmup}, divided by the wall-clock time of those steps, plus, "
        "where a tool precomputes reference log-probs, the timed steps' share of that pass (the pass covers the "
        "whole epoch). **train-only** leaves the precompute pass out. **peak MiB** is the worker process's "
        f"{memory} (imports and model loading included). **train MiB** is what training itself adds: the peak "
        "during the optimizer steps above the memory in use when the first one began (model loaded, reference "
        "pass done; on a CPU the resident set's high-water mark, reset through /proc/self/clear_refs). Ratios "
        "are qalign / TRL: speed above 1 and memory below 1 favour qalign. Matched-settings modes come first.",
        "",
        "| stage | mode | qalign tok/s | TRL tok/s | speed ratio | qalign train-only | TRL train-only "
        "| qalign peak MiB | TRL peak MiB | memory ratio | qalign train MiB | TRL train MiB | train memory ratio |"
        + (" qalign MFU | TRL MFU |" if device == "cuda" else ""),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        + ("---:|---:|" if device == "cuda" else ""),
    ]
    for row in rows:
        ours, theirs = row["qalign"], row["trl"]
        line = (
            f"| {row['stage']} | {row['mode']} | {ours['tokens_per_s']:,.0f} | {theirs['tokens_per_s']:,.0f} | "
            f"**{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x** | {ours['tokens_per_s_train']:,.0f} | "
            f"{theirs['tokens_per_s_train']:,.0f} | {ours['peak_mib']:,.0f} | {theirs['peak_mib']:,.0f} | "
            f"**{ours['peak_mib'] / theirs['peak_mib']:.2f}x** | {_mib(ours)} | {_mib(theirs)} | "
            f"**{_ratio(ours, theirs)}** |"
        )
        if device == "cuda":
            line += " ".join(
                f" {value:.1%} |" if value is not None else " n/a |"
                for value in (mfu(ours, model, args), mfu(theirs, model, args))
            )
        lines.append(line)
    lines += [
        "",
        "## Against the targets",
        "",
        "| stage | mode | speed target | speed | memory | met |",
        "|---|---|---:|---:|---:|---|",
    ]
    for stage, mode, target in TARGETS:
        row = next((r for r in rows if r["stage"] == stage and r["mode"] == mode), None)
        if row is None:
            continue
        speed = row["qalign"]["tokens_per_s"] / row["trl"]["tokens_per_s"]
        memory = row["qalign"]["peak_mib"] / row["trl"]["peak_mib"]
        met = "yes" if speed >= target and memory <= 1 else "**no**"
        lines.append(f"| {stage} | {mode} | {target}x | {speed:.2f}x | {memory:.2f}x | {met} |")
    lines += ["", "## Settings of each mode", "", "| stage | mode | qalign | TRL |", "|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['stage']} | {row['mode']} | {_settings(row['qalign']['settings'])} | "
            f"{_settings(row['trl']['settings'])} |"
        )
    levers = lever_rows(summary, args)
    if levers:
        lines += [
            "",
            "## What each qalign lever is worth",
            "",
            "qalign at gc-on with one optimization turned off at a time (benchmarks/bench_levers.py replaces the "
            "function in the worker process; the recipe keys are set with `--set`), against qalign at gc-on, in "
            "the same run. Speed-up is tokens/s with the lever on / off (wall-clock, precompute included).",
            "",
            "| lever | stage | tok/s on | tok/s off | speed-up | peak MiB on | peak MiB off |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for row in levers:
            on, off = row["on"], row["off"]
            lines.append(
                f"| {LEVER_TEXT[row['lever']]} | {row['stage']} | {on['tokens_per_s']:,.0f} | "
                f"{off['tokens_per_s']:,.0f} | {on['tokens_per_s'] / off['tokens_per_s']:.2f}x | "
                f"{on['peak_mib']:,.0f} | {off['peak_mib']:,.0f} |"
            )
    notes = Path(__file__).with_name("RESULTS_NOTES.md")
    if notes.exists():
        lines += ["", notes.read_text(encoding="utf-8").rstrip()]
    if device != "cuda":
        lines += [
            "",
            "## GPU",
            "",
            "Not run: this run had no GPU. On one, `python benchmarks/bench.py --model qwen2.5-0.5b` (or "
            "`llama-3.2-1b`: real architectures' shapes, random weights) reports `torch.cuda.max_memory_allocated` "
            "and model FLOPs utilization (6 x non-embedding parameters per token, against the GPU's dense bf16 "
            "peak; `--peak-tflops` sets it) for both tools.",
        ]
    return "\n".join(lines) + "\n"


def _settings(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items())
