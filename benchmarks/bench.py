"""qalign against TRL (SFTTrainer/DPOTrainer + peft + bitsandbytes), side by side on the same machine in one run.

Every measurement is a separate worker process (bench_worker.py); the tools alternate, each configuration is
repeated, and the table shows medians. Two workloads (bench_setup.py): `uniform` data in every mode, and
`mixed`-length data in the modes --mixed-modes names. Steady-state speed and start-up are reported apart. The results, with the machine, versions and command, go to
benchmarks/RESULTS.md.

    make bench                                     # the full run
    .venv/bin/python benchmarks/bench.py --quick   # a smoke run in a few minutes (not a measurement)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_report import CPU_KINDS, machine, render_results, results_table  # noqa: E402
from bench_setup import MODELS, WORKLOADS, build_model, write_data  # noqa: E402
from bench_worker import MODES  # noqa: E402

# Lever measurements: (name, stage, what the worker gets to turn the lever off). The baseline is qalign at
# gc-on from the main comparison; gradient checkpointing itself is the gc-on/gc-off pair there.
LEVER_RUNS = [
    ("selective-head", "sft", ["--lever", "selective-head"]),
    ("selective-head", "dpo", ["--lever", "selective-head"]),
    ("shared-prompt", "dpo", ["--lever", "shared-prompt"]),
    ("concat-forward", "dpo", ["--lever", "concat-forward"]),
    ("precompute-reference", "dpo", ["--set", "dpo.reference=live"]),
    ("fused-lora", "sft", ["--lever", "fused-lora"]),
    ("fused-lora", "dpo", ["--lever", "fused-lora"]),
    ("lora-layer", "sft", ["--lever", "lora-layer"]),
    ("lora-layer", "dpo", ["--lever", "lora-layer"]),
    ("fused-rmsnorm", "sft", ["--lever", "fused-rmsnorm"]),
    ("fused-rmsnorm", "dpo", ["--lever", "fused-rmsnorm"]),
    ("keep-freed-memory", "sft", ["--lever", "keep-freed-memory"]),
    ("keep-freed-memory", "dpo", ["--lever", "keep-freed-memory"]),
    ("compute-dtype", "sft", ["--set", "model.compute_dtype=fp32"]),
    ("compute-dtype", "dpo", ["--set", "model.compute_dtype=fp32"]),
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--stages", nargs="+", choices=("sft", "dpo"), default=["sft", "dpo"])
    parser.add_argument(
        "--modes", nargs="+", choices=MODES, default=list(MODES), help="modes on uniform data"
    )
    parser.add_argument(
        "--workloads",
        "--data",
        nargs="+",
        choices=WORKLOADS,
        default=list(WORKLOADS),
        help="uniform: every example the same length; mixed: skewed lengths, 8-300 tokens a part",
    )
    parser.add_argument(
        "--mixed-modes",
        nargs="+",
        choices=MODES,
        default=["defaults", "gc-on", "padded", "packed"],
        help="modes on mixed data",
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument(
        "--prompt-words", type=int, default=58, help="with the chat template: ~64 prompt tokens"
    )
    parser.add_argument("--response-words", type=int, default=62, help="with the chat template: ~64 tokens")
    parser.add_argument("--levers", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--peak-tflops", type=float, default=None, help="GPU peak for MFU (default: by name)")
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps, one repetition")
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="where to write (default benchmarks/RESULTS.md; --quick: nowhere)",
    )
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument(
        "--cpu-kind",
        choices=sorted(CPU_KINDS),
        default="native",
        help="avx2: emulate an AVX2-only CPU (default results file RESULTS_AVX2.md)",
    )
    args = parser.parse_args()
    if args.quick:
        args.model, args.reps, args.steps, args.warmup, args.levers = "tiny", 1, 4, 1, False
        args.prompt_words, args.response_words = 8, 8
        # One mode is enough to see that the mixed workload runs.
        args.mixed_modes = ["defaults"]
        # A smoke run does not overwrite the recorded results, unless told where to write.
        args.no_write = args.no_write or args.results is None
    if args.results is None:
        args.results = HERE / (
            "RESULTS.md" if args.cpu_kind == "native" else f"RESULTS_{args.cpu_kind.upper()}.md"
        )
    return args


def emulate(kind: str) -> None:
    """Restart this process with the CPU kind's environment, which torch reads when it loads (the workers
    inherit it); a no-op when it is already set."""
    wanted = CPU_KINDS[kind]
    if all(os.environ.get(k) == v for k, v in wanted.items()):
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **wanted})


def compute_is_fp32() -> bool:
    import torch

    from qalign.model import compute_dtype

    return (
        compute_dtype("auto", torch.device("cuda" if torch.cuda.is_available() else "cpu")) == torch.float32
    )


def modes_of(args: argparse.Namespace, workload: str) -> list[str]:
    return args.modes if workload == "uniform" else args.mixed_modes


def run_worker(
    args: argparse.Namespace,
    root: Path,
    workload: dict,
    tool: str,
    stage: str,
    mode: str,
    extra: list[str],
) -> dict:
    name = workload["workload"]
    tag = f"{tool}-{stage}-{mode}-{name}-{abs(hash(tuple(extra))) % 10**6}-{len(list(root.glob('out/*')))}"
    out = root / "out" / f"{tag}.json"
    command = [
        sys.executable,
        str(HERE / "bench_worker.py"),
        *("--tool", tool, "--stage", stage, "--mode", mode),
        *("--model", str(root / "model"), "--data", str(root / "data" / name)),
        *("--workdir", str(root / "work" / tag), "--out", str(out)),
        *("--steps", str(args.steps), "--warmup", str(args.warmup)),
        *("--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum)),
        # Room for the chat template's tokens: nothing is ever truncated.
        *("--max-length", str(workload["max_words"] + 64)),
        *extra,
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"worker failed ({tool} {stage} {mode} {' '.join(extra)}): exit {done.returncode}")
    return json.loads(out.read_text(encoding="utf-8"))


def medians(runs: list[dict]) -> dict:
    keys = ("tokens_per_s", "tokens_per_s_train", "peak_mib", "train_mib", "precompute_s")
    out = {k: statistics.median(r[k] for r in runs) for k in keys}
    for key in ("startup_s", "first_step_s"):
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    first = runs[0]
    out.update(
        phases={k: statistics.median(r["phases"].get(k, 0.0) for r in runs) for k in first["phases"]},
        startup_clock=first["startup_clock"],
        settings=first["settings"],
        memory=first["memory"],
        device=first["device"],
        reps=len(runs),
        step_tokens=first["step_tokens"][-1],
    )
    return out


def main() -> None:
    args = parse_args()
    emulate(args.cpu_kind)
    console = Console(width=max(Console().width, 120))
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit("TRL is not installed: pip install -e '.[bench]' (or run `make bench`)") from None
    with tempfile.TemporaryDirectory(prefix="qalign-bench-") as tmp:
        root = Path(tmp)
        model = build_model(args.model, root / "model")
        # One epoch exactly: a reference precompute pass then covers precisely the data the run trains on.
        workloads = {
            name: write_data(
                root / "data" / name,
                args.steps * args.batch_size * args.grad_accum,
                args.prompt_words,
                args.response_words,
                workload=name,
            )
            for name in args.workloads
        }
        console.print(
            f"model {model['name']}: {model['parameters'] / 1e6:.1f}M parameters; {machine()['cpu']}"
        )
        runs: dict[tuple, list[dict]] = {}
        for rep in range(args.reps):
            for stage in args.stages:
                for workload, data in workloads.items():
                    for mode in modes_of(args, workload):
                        # Alternate which tool goes first, so neither always runs on a warmer (or hotter) machine.
                        tools = ("qalign", "trl") if rep % 2 == 0 else ("trl", "qalign")
                        for tool in tools:
                            result = run_worker(args, root, data, tool, stage, mode, [])
                            runs.setdefault((tool, stage, mode, workload), []).append(result)
                            console.print(
                                f"  rep {rep + 1}/{args.reps} {stage} {workload:7} {mode:8} {tool:6} "
                                f"{result['tokens_per_s']:8.0f} tok/s  {result['peak_mib']:7.0f} MiB  "
                                f"first step at {result['first_step_s']:5.1f} s"
                            )
                # In fp32, TRL's adapters still run in bf16 (its cast for 4-bit bases), which a CPU without
                # native bf16 emulates: measured once more with them in fp32, to show what the cast costs.
                if "uniform" in workloads and "gc-on" in args.modes and compute_is_fp32():
                    extra = ["--trl-adapters", "compute"]
                    result = run_worker(args, root, workloads["uniform"], "trl", stage, "gc-on", extra)
                    runs.setdefault(("trl-fp32-adapters", stage, "gc-on", "uniform"), []).append(result)
                    console.print(
                        f"  rep {rep + 1}/{args.reps} {stage} uniform gc-on    TRL, fp32 adapters "
                        f"{result['tokens_per_s']:8.0f} tok/s  {result['peak_mib']:7.0f} MiB"
                    )
                # Levers are measured on the uniform workload, against qalign's gc-on there.
                if args.levers and "uniform" in workloads:
                    for name, lever_stage, extra in LEVER_RUNS:
                        if lever_stage != stage:
                            continue
                        result = run_worker(args, root, workloads["uniform"], "qalign", stage, "gc-on", extra)
                        runs.setdefault(("lever", name, stage, "uniform"), []).append(result)
                        console.print(
                            f"  rep {rep + 1}/{args.reps} lever off: {name} ({stage}) "
                            f"{result['tokens_per_s']:8.0f} tok/s  {result['peak_mib']:7.0f} MiB"
                        )
        summary = {key: medians(value) for key, value in runs.items()}
    console.print(results_table(summary, args, model))
    if not args.no_write:
        text = render_results(summary, args, model, sys.argv, workloads)
        args.results.write_text(text, encoding="utf-8")
        console.print(f"written to {args.results}")


if __name__ == "__main__":
    main()
