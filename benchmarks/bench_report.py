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
from bench_setup import MIXED_MEDIAN, MIXED_RANGE
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
# (stage, mode, minimum qalign/TRL tokens/s, where it comes from); peak memory no higher. Issue #22's targets are
# at matched settings (gradient checkpointing on in both tools, or off in both); the older defaults target
# compares the tools as they ship.
TARGETS = [
    ("sft", "gc-on", 1.5, "#22"),
    ("sft", "gc-off", 1.5, "#22"),
    ("dpo", "gc-on", 3.0, "#22"),
    ("dpo", "gc-off", 3.0, "#22"),
    ("dpo", "defaults", 2.5, "the first benchmark's"),
]
# How an AVX2-only CPU (no AVX512, no native bf16: older Intel, AMD before Zen 4) is emulated on a newer one:
# torch's own kernels at its AVX2 level (bitsandbytes' CPU backend follows that level too), oneDNN and MKL
# limited to AVX2. The caches, memory bandwidth and clock stay this machine's.
CPU_KINDS = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "trl", "datasets")
LEVER_TEXT = {
    **LEVERS,
    "precompute-reference": "reference log-probs precomputed once per dataset (off: dpo.reference=live, every step)",
    "gradient-checkpointing": "gradient checkpointing (off: gc-off); a memory lever, not a speed one",
    "compute-dtype": "compute dtype auto, bf16 where the CPU multiplies it natively (off: model.compute_dtype=fp32)",
}


# The /proc/cpuinfo flags that decide how fast bf16 and 4-bit matmuls run on a CPU, and what they mean.
CPU_FLAGS = {
    "avx512_bf16": "AVX512-BF16",
    "amx_bf16": "AMX-BF16",
    "amx_tile": "AMX tiles",
    "avx512f": "AVX512F",
    "avx2": "AVX2",
}


def cpu_facts(cpuinfo: str | None) -> dict:
    """The CPU model and, for each of CPU_FLAGS, True/False, or None where /proc/cpuinfo could not be read (not
    Linux): unknown, not absent."""
    model, flags = None, None
    for line in (cpuinfo or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model is None:
            model = value.strip()
        if key.strip() == "flags" and flags is None:
            flags = set(value.split())
    return {
        "cpu_model": model or platform.processor() or platform.machine(),
        "cpu_flags": {flag: None if flags is None else flag in flags for flag in CPU_FLAGS},
    }


def machine() -> dict:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = None
    facts = cpu_facts(cpuinfo)
    info = {
        "cpu": f"{facts['cpu_model']}, {os.cpu_count()} cores",
        **facts,
        "python": platform.python_version(),
        "os": platform.platform(),
    }
    import torch

    from qalign.model import compute_dtype, cpu_has_native_bf16

    # What qalign's `compute_dtype: auto` picks on this CPU, by qalign's own rule (torch's CPU checks).
    info["cpu_native_bf16"] = cpu_has_native_bf16()
    info["cpu_auto_dtype"] = str(compute_dtype("auto", torch.device("cpu"))).removeprefix("torch.")

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
    for workload in args.workloads:
        modes = args.modes if workload == "uniform" else args.mixed_modes
        for stage in args.stages:
            for mode in sorted(modes, key=lambda mode: mode == "defaults"):
                key = (stage, mode, workload)
                ours, theirs = summary.get(("qalign", *key)), summary.get(("trl", *key))
                if ours and theirs:
                    rows.append(
                        {"stage": stage, "mode": mode, "workload": workload, "qalign": ours, "trl": theirs}
                    )
    return rows


def lever_rows(summary: dict, args: argparse.Namespace) -> list[dict]:
    rows = []
    for (kind, name, stage, workload), entry in summary.items():
        base = summary.get(("qalign", stage, "gc-on", workload))
        if kind == "lever" and base:
            rows.append({"lever": name, "stage": stage, "on": base, "off": entry})
    for stage in args.stages:
        on = summary.get(("qalign", stage, "gc-on", "uniform"))
        off = summary.get(("qalign", stage, "gc-off", "uniform"))
        if on and off:
            rows.append({"lever": "gradient-checkpointing", "stage": stage, "on": on, "off": off})
    return rows


def results_table(summary: dict, args: argparse.Namespace, model: dict) -> Table:
    table = Table(title=f"qalign vs TRL, {model['name']} model, medians of {args.reps}")
    text = ("workload", "stage", "mode", "tool")
    for column in (
        *text,
        "tokens/s",
        "train-only tok/s",
        "peak MiB",
        "speed ratio",
        "memory ratio",
        "to 1st step s",
        "through 1st step s",
    ):
        table.add_column(column, justify="left" if column in text else "right")
    for row in comparisons(summary, args):
        ours, theirs = row["qalign"], row["trl"]
        for tool, entry in (("qalign", ours), ("trl", theirs)):
            ratio = tool == "qalign"
            table.add_row(
                row["workload"],
                row["stage"],
                row["mode"],
                tool,
                f"{entry['tokens_per_s']:,.0f}",
                f"{entry['tokens_per_s_train']:,.0f}",
                f"{entry['peak_mib']:,.0f}",
                f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x" if ratio else "",
                f"{ours['peak_mib'] / theirs['peak_mib']:.2f}x" if ratio else "",
                _seconds(entry.get("startup_s")),
                _seconds(entry.get("first_step_s")),
            )
    return table


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _flags(info: dict) -> str:
    flags = info["cpu_flags"]
    if all(value is None for value in flags.values()):
        return "flags unknown (no /proc/cpuinfo)"
    return ", ".join(f"{text} {'yes' if flags[flag] else 'no'}" for flag, text in CPU_FLAGS.items())


def describe_workload(workload: dict, args: argparse.Namespace) -> str:
    """One line on what a workload's examples look like, from the lengths write_data reports."""
    if workload["workload"] == "uniform":
        return (
            f"`uniform`: every prompt {args.prompt_words} and every response {args.response_words} words, one "
            "token each (plus the chat template's tokens): no padding"
        )
    return (
        f"`mixed`: each prompt, response, chosen and rejected its own length, log-normal around {MIXED_MEDIAN} "
        f"tokens clipped to {MIXED_RANGE[0]}-{MIXED_RANGE[1]} (seed 0); prompt + response {workload['min_words']}"
        f"-{workload['max_words']} tokens, median {workload['median_words']:g} (before the chat template). "
        "Batches pad to their longest row; tokens/s counts the tokens, not the padding"
    )


def startup_lines(rows: list[dict]) -> list[str]:
    """The start-up table (qalign vs TRL per row) and each tool's breakdown by stage, medians."""
    if not rows or rows[0]["qalign"].get("startup_s") is None:
        return []
    clock = rows[0]["qalign"]["startup_clock"]
    lines = [
        "",
        "## Start-up",
        "",
        f"Seconds from the worker process's start (measured from {clock}) to the beginning of the first optimizer step (imports, "
        "loading and quantizing, data preparation, the memory plan, the DPO reference pass) and through its end. "
        "The tokens/s above leave all of this out; ratios are qalign / TRL, below 1 favours qalign.",
        "",
        "| workload | stage | mode | qalign to 1st step | TRL to 1st step | ratio | qalign through 1st step "
        "| TRL through 1st step | ratio |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ours, theirs = row["qalign"], row["trl"]
        cells = []
        for key in ("startup_s", "first_step_s"):
            a, b = ours.get(key), theirs.get(key)
            ratio = f"{a / b:.2f}x" if a is not None and b else "n/a"
            cells += [_seconds(a), _seconds(b), ratio]
        lines.append(f"| {row['workload']} | {row['stage']} | {row['mode']} | " + " | ".join(cells) + " |")
    for tool, name in (("qalign", "qalign"), ("trl", "TRL")):
        lines += [
            "",
            f"Where {name}'s seconds before the first step go (medians; `other` is what the named stages leave "
            "unaccounted: building the trainer, the optimizer, the first batch):",
            "",
        ]
        names = list(dict.fromkeys(k for row in rows for k in row[tool]["phases"] if k != "other"))
        names.append("other")
        lines += [
            "| workload | stage | mode | " + " | ".join(names) + " |",
            "|---|---|---|" + "---:|" * len(names),
        ]
        for row in rows:
            phases = row[tool]["phases"]
            lines.append(
                f"| {row['workload']} | {row['stage']} | {row['mode']} | "
                + " | ".join(f"{phases[k]:.2f}" if k in phases else "" for k in names)
                + " |"
            )
    return lines


def emulated_line(kind: str) -> str:
    settings = ", ".join(f"{k}={v}" for k, v in CPU_KINDS[kind].items())
    return (
        f" **Emulated {kind.upper()}-only CPU** ({settings}): torch's kernels run at its {kind.upper()} level "
        "(bitsandbytes' CPU backend follows it), oneDNN and MKL are limited to the same instructions, and "
        "`auto` picks fp32 as it would on such a CPU. The caches, memory bandwidth and clock are still this "
        "machine's, so this shows the kernels' share of the work, not a particular AVX2 machine's speed."
    )


def adapter_cast_lines(summary: dict) -> list[str]:
    """What TRL's bf16 adapters cost where the compute dtype is fp32 (bench.py measures it only there)."""
    lines = []
    for (kind, stage, mode, workload), cast_back in summary.items():
        ours, theirs = (
            summary.get(("qalign", stage, mode, workload)),
            summary.get(("trl", stage, mode, workload)),
        )
        if kind != "trl-fp32-adapters" or not ours or not theirs:
            continue
        if not lines:
            lines = [
                "",
                "TRL casts a 4-bit model's adapters to bf16 whatever the compute dtype (the QLoRA paper's recipe); "
                "in fp32 this CPU then runs the adapters' matmuls in emulated bf16. The same TRL run with its "
                "adapters put back in fp32 after the trainer is built (bench_trl.py, `--trl-adapters compute`), "
                f"{workload} workload:",
                "",
                "| stage | mode | TRL as it ships tok/s | TRL, fp32 adapters tok/s | qalign tok/s | qalign / TRL as it "
                "ships | qalign / TRL, fp32 adapters |",
                "|---|---|---:|---:|---:|---:|---:|",
            ]
        speed = ours["tokens_per_s"]
        lines.append(
            f"| {stage} | {mode} | {theirs['tokens_per_s']:,.0f} | {cast_back['tokens_per_s']:,.0f} | {speed:,.0f} "
            f"| **{speed / theirs['tokens_per_s']:.2f}x** | **{speed / cast_back['tokens_per_s']:.2f}x** |"
        )
    return lines


def render_results(
    summary: dict, args: argparse.Namespace, model: dict, argv: list[str], workloads: dict[str, dict]
) -> str:
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
        f"- CPU: {_flags(info)}; qalign's `compute_dtype: auto` resolves to {info['cpu_auto_dtype']} on it "
        f"(native bf16: {'yes' if info['cpu_native_bf16'] else 'no'}). **The figures below hold for this CPU**: "
        "bf16 and 4-bit kernels differ between CPU kinds (AMX, AVX512-BF16, AVX2 only), and so does the ratio "
        "between the tools; nothing here is promised on another CPU."
        + ("" if getattr(args, "cpu_kind", "native") == "native" else emulated_line(args.cpu_kind)),
        f"- Python {info['python']}, " + ", ".join(f"{name} {info[name]}" for name in PACKAGES),
        f"- Model: random-weight {model['architecture']} `{model['name']}`, {model['parameters'] / 1e6:.1f}M "
        f"parameters ({model['non_embedding'] / 1e6:.1f}M without the input embeddings), NF4 4-bit with double "
        f"quantization, compute in {dtype} for both tools (what qalign's `compute_dtype: auto` picks here: bf16 "
        "on a GPU or CPU that multiplies bf16 natively, else fp32); LoRA r=16, alpha 32, on every linear layer but "
        "the LM head",
        f"- Run: {args.steps} optimizer steps of batch {args.batch_size} x grad_accum {args.grad_accum}, "
        "AdamW (torch), lr 1e-4, linear schedule; one epoch of generated data (ChatML; DPO pairs share the "
        "prompt), in each workload:",
        *(f"  - {describe_workload(workload, args)}" for workload in workloads.values()),
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
        "are qalign / TRL: speed above 1 and memory below 1 favour qalign. Matched-settings modes come first. "
        "Modes **padded** and **packed** are matched settings (gradient checkpointing on in both tools, TRL's DPO "
        "reference precomputed) with the padding-free layout off and on (qalign's `packing`, whose `auto` default "
        "packs here; TRL's `padding_free`, which TRL 1.16 switches back off for DPO, so its DPO rows stay padded "
        "in both).",
        "",
        "| workload | stage | mode | qalign tok/s | TRL tok/s | speed ratio | qalign train-only | TRL train-only "
        "| qalign peak MiB | TRL peak MiB | memory ratio | qalign train MiB | TRL train MiB | train memory ratio |"
        + (" qalign MFU | TRL MFU |" if device == "cuda" else ""),
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        + ("---:|---:|" if device == "cuda" else ""),
    ]
    for row in rows:
        ours, theirs = row["qalign"], row["trl"]
        line = (
            f"| {row['workload']} | {row['stage']} | {row['mode']} | {ours['tokens_per_s']:,.0f} | {theirs['tokens_per_s']:,.0f} | "
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
    lines += startup_lines(rows)
    lines += [
        "",
        "## Against the targets",
        "",
        "On the uniform workload.",
        "",
        "| stage | mode | target from | speed target | speed | memory | met |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for stage, mode, target, source in TARGETS:
        row = next(
            (r for r in rows if (r["stage"], r["mode"], r["workload"]) == (stage, mode, "uniform")), None
        )
        if row is None:
            continue
        speed = row["qalign"]["tokens_per_s"] / row["trl"]["tokens_per_s"]
        memory = row["qalign"]["peak_mib"] / row["trl"]["peak_mib"]
        met = "yes" if speed >= target and memory <= 1 else "**no**"
        lines.append(f"| {stage} | {mode} | {source} | {target}x | {speed:.2f}x | {memory:.2f}x | {met} |")
    lines += adapter_cast_lines(summary)
    lines += ["", "## Settings of each mode", "", "| stage | mode | qalign | TRL |", "|---|---|---|---|"]
    shown = set()
    for row in rows:
        # The same in every workload: once per stage and mode.
        if (row["stage"], row["mode"]) in shown:
            continue
        shown.add((row["stage"], row["mode"]))
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
