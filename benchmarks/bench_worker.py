"""One benchmark measurement in its own process: one tool (qalign or TRL), one stage, one mode.

Its own process, so that peak memory (peak RSS on a CPU, `torch.cuda.max_memory_allocated` on a GPU) belongs to
this measurement alone. Both tools are timed the same way: the clock reads at the end of every optimizer step,
the first `--warmup` steps are left out, and tokens are the non-padding input tokens of the timed steps (prompt
and response; chosen and rejected both count in DPO). A reference precompute pass, where a tool makes one, is
timed separately and its share of the run is added to the wall-clock figure.

Start-up is measured apart from that steady state: seconds from the process's start (interpreter and imports
included) to the beginning of the first optimizer step and to its end, with the stages before it that each tool
side times (imports, model, data, the reference pass).

    python benchmarks/bench_worker.py --tool qalign --stage dpo --mode defaults --model M --data D --out r.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

# The fallback start-up clock where /proc/self/stat is missing (not Linux): it misses the interpreter and the
# imports above, torch's among them.
IMPORTED = time.perf_counter()

# What each mode changes; everything else (the workload) is the same for both tools in every mode.
# padded / packed: each tool's defaults with its padding-free layout off / on (qalign's `packing`, TRL's
# `padding_free`); for the mixed workload, where padding is what there is to save.
MODES = ("defaults", "gc-on", "gc-off", "padded", "packed")
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tool", choices=("qalign", "trl"), required=True)
    parser.add_argument("--stage", choices=("sft", "dpo"), required=True)
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--model", type=Path, required=True, help="model folder (config, weights, tokenizer)")
    parser.add_argument("--data", type=Path, required=True, help="folder with sft.jsonl and dpo.jsonl")
    parser.add_argument("--workdir", type=Path, required=True, help="scratch folder for this run")
    parser.add_argument("--out", type=Path, required=True, help="where to write the result as JSON")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="leading steps left out of the timing")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="qalign only: a recipe override K=V"
    )
    parser.add_argument(
        "--trl-adapters",
        choices=("trl", "compute"),
        default="trl",
        help="TRL only: its adapters as TRL makes them (bf16 with a 4-bit base) or in the compute dtype",
    )
    parser.add_argument(
        "--lever",
        action="append",
        default=[],
        help="qalign only: turn an optimization off (see bench_levers.py)",
    )
    return parser.parse_args(argv)


def qalign_settings(stage: str, mode: str) -> dict:
    """The recipe keys a mode sets for qalign; unset keys keep qalign's defaults."""
    if mode == "defaults":
        return {}
    if mode in ("padded", "packed"):
        # Matched with TRL's: checkpointing on, the layout the only difference between the two modes.
        return {"packing": mode == "packed", "gradient_checkpointing": True}
    return {"gradient_checkpointing": mode == "gc-on"}


def trl_settings(stage: str, mode: str) -> dict:
    """The SFTConfig/DPOConfig fields a mode sets for TRL; unset fields keep TRL's defaults."""
    if mode == "defaults":
        return {}
    settings: dict = {"gradient_checkpointing": mode != "gc-off"}
    if mode in ("padded", "packed"):
        # TRL 1.16's DPOTrainer turns padding_free back off (with a warning): its DPO rows stay padded.
        settings["padding_free"] = mode == "packed"
    if stage == "dpo":
        # Matched: the reference costs both tools one pass over the data, as it does qalign by default.
        settings["precompute_ref_log_probs"] = True
    return settings


class StepClock:
    """End-of-step timestamps and the tokens each step processed; the same bookkeeping for both tools."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.tokens: list[int] = []
        self.pending = 0
        self.precompute_s = 0.0
        self.baseline_mib: float | None = None
        # Seconds since the process started, at the first step's beginning and end; the stages before it.
        self.first_step_begins: float | None = None
        self.first_step_ends: float | None = None
        self.phases: dict[str, float] = {}

    def training_begins(self) -> None:
        """Called as each optimizer step starts. At the first (model loaded, any reference pass done) start-up
        ends, and memory from there on is what training itself costs, apart from imports, loading and the
        allocator's earlier state."""
        if self.first_step_begins is None:
            self.first_step_begins = process_age_s()
        if self.baseline_mib is None:
            self.baseline_mib = reset_peak_memory()

    @contextmanager
    def phase(self, name: str):
        """Adds the time spent inside the block to start-up stage `name`."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - began

    def timed(self, name: str, function):
        """`function`, with the time spent in its calls added to start-up stage `name`."""

        def wrapper(*args, **kwargs):
            with self.phase(name):
                return function(*args, **kwargs)

        return wrapper

    def startup(self) -> dict:
        """Start-up: to the first step's beginning and through its end; the timed stages in order, with what
        they leave unaccounted as `other` (for the reference pass, see precompute_s)."""
        phases = dict(self.phases)
        if self.precompute_s:
            phases["reference pass"] = self.precompute_s
        if self.first_step_begins is not None:
            phases["other"] = max(self.first_step_begins - sum(phases.values()), 0.0)
        return {
            "startup_s": self.first_step_begins,
            "first_step_s": self.first_step_ends,
            "startup_clock": STARTUP_CLOCK,
            "phases": phases,
        }

    def step_done(self, tokens: int | None = None) -> None:
        if self.first_step_ends is None:
            self.first_step_ends = process_age_s()
        self.ends.append(time.perf_counter())
        self.tokens.append(self.pending if tokens is None else tokens)
        self.pending = 0

    def summary(self, warmup: int, steps: int) -> dict:
        if len(self.ends) <= warmup:
            raise SystemExit(f"only {len(self.ends)} steps ran; need more than --warmup={warmup}")
        timed_s = self.ends[-1] - self.ends[warmup - 1] if warmup else self.ends[-1] - self.ends[0]
        timed_steps = len(self.ends) - max(warmup, 1)
        tokens = sum(self.tokens[max(warmup, 1) :])
        # The precompute pass covers the whole dataset, which is exactly `steps` steps of data: the timed
        # steps carry their share of it.
        share = self.precompute_s * timed_steps / steps
        return {
            "timed_steps": timed_steps,
            "timed_s": timed_s,
            "tokens": tokens,
            "tokens_per_s_train": tokens / timed_s,
            "precompute_s": self.precompute_s,
            "tokens_per_s": tokens / (timed_s + share),
            "step_tokens": self.tokens,
        }


def _proc_age_s() -> float | None:
    """Seconds since this process started: its start time in /proc/self/stat (clock ticks since boot) against
    the boot clock. None where Linux's /proc is missing."""
    try:
        # The command name (field 2) may hold spaces; fields after it are plain. Field 22 is the start time.
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


STARTUP_CLOCK = (
    "its start time in /proc/self/stat"
    if _proc_age_s() is not None
    else "the end of bench_worker's imports: the interpreter's start and torch's import are not counted"
)


def process_age_s() -> float:
    """Seconds since the process started (see STARTUP_CLOCK for where that is measured from)."""
    age = _proc_age_s()
    return age if age is not None else time.perf_counter() - IMPORTED


def peak_memory_mib() -> tuple[float, str]:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "cuda.max_memory_allocated"
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, "peak RSS"


def reset_peak_memory() -> float:
    """Memory in use now (MiB), with the peak counter restarted from it: allocated CUDA memory on a GPU; on
    Linux the resident set, whose high-water mark (VmHWM) writing 5 to clear_refs resets."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return float("nan")
    return _status_kib("VmRSS") / 1024


def training_peak_mib() -> float:
    """The peak since reset_peak_memory, in MiB (nan where it cannot be read)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        return _status_kib("VmHWM") / 1024
    except (OSError, ValueError):
        return float("nan")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise ValueError(f"no {field} in /proc/self/status")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    clock = StepClock()
    clock.phases["interpreter, torch import"] = process_age_s()
    started = time.perf_counter()
    if args.tool == "qalign":
        from bench_qalign import run_qalign

        settings = run_qalign(args, clock)
    else:
        from bench_trl import run_trl

        settings = run_trl(args, clock)
    total_s = time.perf_counter() - started
    # Read before peak_memory_mib: on a CPU the process's lifetime peak (ru_maxrss) is unaffected by the reset,
    # the resident high-water mark is the training loop's.
    train_peak = training_peak_mib()
    peak, how = peak_memory_mib()
    result = {
        "tool": args.tool,
        "stage": args.stage,
        "mode": args.mode,
        "settings": settings,
        "levers_off": args.lever,
        "overrides": args.overrides,
        "peak_mib": peak,
        "memory": how,
        # Training memory: the peak during the optimizer steps above what was in use when they began.
        "train_mib": train_peak - clock.baseline_mib if clock.baseline_mib is not None else float("nan"),
        "baseline_mib": clock.baseline_mib,
        "process_s": total_s,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        **clock.summary(args.warmup, args.steps),
        **clock.startup(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
