"""One command for a machine with a CUDA GPU and no network: train Llama-3.2-1B- and Llama-3.1-8B-shaped models
through the real CLI and compare what they use with what `qalign plan` predicts.

It builds each model from its config (the shapes in qalign/architectures.py, random weights, saved as
safetensors), writes generated data and a recipe, runs `python -m qalign sft` and `python -m qalign dpo` (and one
SFT run with compute_dtype: fp16), and writes tokens/s, model FLOPs utilization and the measured peak
(`torch.cuda.max_memory_allocated`, from the final record of metrics.jsonl) against the plan to
benchmarks/GPU_RESULTS.md, after every run, so a run cut short still leaves what it measured.

    python benchmarks/gpu_check.py                        # about 6-8 minutes on one H100/H200-class GPU
    python benchmarks/gpu_check.py --skip-8b              # the 1B runs only
    python benchmarks/gpu_check.py --tiny --cpu --out X   # smoke test of everything but the GPU (seconds)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

GiB = 2**30
# Dense bf16/fp16 tensor-core peaks (TFLOP/s), by a substring of the device name; --peak-tflops overrides.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}
TINY = dict(
    model_type="llama",
    vocab_size=4096,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


@dataclass(frozen=True)
class Run:
    model: str  # a key of the built-in table, or "tiny"
    stage: str  # sft | dpo
    dtype: str  # the recipe's compute_dtype
    offload: bool = False  # activation_offloading

    @property
    def label(self) -> str:
        return f"{self.stage} + offloading" if self.offload else self.stage


@dataclass(frozen=True)
class Sizes:
    """The workload: SFT rows of about sft_length tokens, DPO sides of about dpo_length (pair rows of about
    twice that), batch 1, gradient checkpointing on."""

    steps: int
    warmup: int
    sft_length: int
    dpo_length: int
    prompt_words: int


FULL = Sizes(steps=8, warmup=3, sft_length=2048, dpo_length=1024, prompt_words=64)
SMOKE = Sizes(steps=2, warmup=1, sft_length=96, dpo_length=64, prompt_words=8)


def runs_for(tiny: bool, skip_8b: bool) -> list[Run]:
    """1B first (the quick answers), then fp16, then the 8B model (its loads take the longest); DPO on the 8B
    model with activation offloading too, against the same run without it."""
    if tiny:
        return [
            Run("tiny", "sft", "fp32"),
            Run("tiny", "dpo", "fp32"),
            Run("tiny", "dpo", "fp32", offload=True),
        ]
    small, big = "meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.1-8B"
    runs = [Run(small, "sft", "bf16"), Run(small, "dpo", "bf16"), Run(small, "sft", "fp16")]
    if skip_8b:
        return runs
    return [*runs, Run(big, "sft", "bf16"), Run(big, "dpo", "bf16"), Run(big, "dpo", "bf16", offload=True)]


def check_imports(cpu: bool) -> str | None:
    """None when everything the runs need is importable and bitsandbytes can quantize on the device, else a
    message saying what to do."""
    try:
        import peft  # noqa: F401
        import torch
        import transformers  # noqa: F401
    except ImportError as exc:
        return f"missing a package ({exc}); install qalign's dependencies (pip install -e .)"
    if not cpu and not torch.cuda.is_available():
        return (
            f"no CUDA device visible to torch {torch.__version__} (a CPU build?); install a CUDA build of "
            "torch, or pass --cpu for the smoke run"
        )
    try:
        import bitsandbytes as bnb
    except ImportError:
        return (
            "bitsandbytes is not installed; without network, bring a wheel for this CUDA and platform "
            "(pip install ./bitsandbytes-<version>-<platform>.whl) and run this again"
        )
    try:
        device = "cpu" if cpu else "cuda"
        bnb.functional.quantize_4bit(
            torch.ones(64, 64, device=device, dtype=torch.bfloat16), quant_type="nf4"
        )
    except Exception as exc:
        return (
            f"bitsandbytes {bnb.__version__} cannot quantize on {device} ({type(exc).__name__}: {exc}); install "
            "a wheel built for this CUDA version"
        )
    return None


def model_config(name: str) -> dict:
    if name == "tiny":
        return dict(TINY)
    from qalign.architectures import known_config

    config = known_config(name)
    if config is None:
        raise SystemExit(f"{name} is not in qalign's built-in table")
    return dict(config)


def build_model(name: str, folder: Path, cpu: bool) -> Path:
    """Random weights in the model's shape, saved as safetensors with the test tokenizer (ids below 1000 fit
    every vocabulary here). Built in bf16 on the GPU: an 8B model in fp32 on the host would take 32 GB."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (folder / "config.json").exists():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "tests" / "assets" / "tokenizer")
    kwargs = model_config(name)
    config = AutoConfig.for_model(
        kwargs.pop("model_type"),
        **kwargs,
        max_position_embeddings=8192,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device("cpu" if cpu else "cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32 if cpu else torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    del model
    if not cpu:
        torch.cuda.empty_cache()
    return folder


def write_data(folder: Path, sizes: Sizes, examples: int) -> None:
    """sft.jsonl and dpo.jsonl whose rows fill most of the recipe's max_length (the template adds a few
    tokens, so the replies leave room for them)."""
    from bench_setup import write_data as bench_data

    margin = 32
    (folder / "sft").mkdir(parents=True, exist_ok=True)
    (folder / "dpo").mkdir(parents=True, exist_ok=True)
    bench_data(folder / "sft", examples, sizes.prompt_words, sizes.sft_length - sizes.prompt_words - margin)
    bench_data(folder / "dpo", examples, sizes.prompt_words, sizes.dpo_length - sizes.prompt_words - margin)


def recipe_text(run: Run, model: Path, data: Path, out: Path, sizes: Sizes) -> str:
    length = sizes.sft_length if run.stage == "sft" else sizes.dpo_length
    train = data / run.stage / f"{run.stage}.jsonl"
    section = "\n".join(
        [
            f"{run.stage}:",
            f"  data: {{train: {train}}}",
            f"  max_length: {length}",
            "  overlong: truncate",
            "  batch_size: 1",
            "  grad_accum: 1",
            f"  max_steps: {sizes.steps}",
            "  gradient_checkpointing: true",
            f"  activation_offloading: {str(run.offload).lower()}",
            "  log_every: 1",
            "  save_every: 100000",
            "  warmup_ratio: 0.0",
            "  lr: 1.0e-4",
        ]
    )
    if run.stage == "dpo":
        section += "\n  reference: precompute"
    return (
        f"name: gpu-check\noutput_dir: {out}\nseed: 0\n"
        f"model: {{base: {model}, quantization: nf4, double_quant: true, compute_dtype: {run.dtype}}}\n"
        "lora: {r: 16, alpha: 32, dropout: 0.05, target_modules: all-linear}\n"
        f"{section}\n"
    )


def flops_per_token(name: str, seq: int) -> float:
    """Model FLOPs per trained-on input token of a QLoRA step, recomputation not counted: the forward's 2 per
    weight of the decoder's linears and the head, the backward's 2 more (the frozen weights need no gradient of
    their own; the adapters' are negligible), and causal attention's 2 * seq * q_width per layer forward, twice
    that backward."""
    config = model_config(name)
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads") or heads
    per_layer = (
        hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2 + 3 * hidden * config["intermediate_size"]
    )
    weights = layers * per_layer + hidden * config["vocab_size"]
    return 4 * weights + 6 * layers * seq * heads * head_dim


def summarize(records: list[dict], warmup: int) -> dict:
    """tokens/s (median of the step records after the warm-up), the measured peak and the plan, from the
    lines of metrics.jsonl."""
    steps = [r for r in records if "tokens_per_s" in r and "step" in r]
    timed = steps[warmup:] or steps
    final = next((r for r in reversed(records) if "peak_memory_bytes" in r), {})
    losses = [r["loss"] for r in steps if isinstance(r.get("loss"), int | float)]
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed) if timed else None,
        "peak_bytes": final.get("peak_memory_bytes"),
        "peak_kind": final.get("peak_memory_kind"),
        "plan_bytes": final.get("plan_total_bytes"),
        "last_loss": losses[-1] if losses else None,
        "steps": len(steps),
    }


def execute(run: Run, work: Path, sizes: Sizes, cpu: bool) -> tuple[dict, float, str]:
    """Train `run` through the CLI; (summary, wall seconds, the CLI's last output lines)."""
    model = build_model(run.model, work / "models" / run.model.replace("/", "--"), cpu)
    tag = f"{run.model.replace('/', '--')}-{run.stage}-{run.dtype}" + ("-offload" if run.offload else "")
    out, recipe = work / "runs" / tag, work / "recipes" / f"{tag}.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(recipe_text(run, model, work / "data", out, sizes), encoding="utf-8")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "qalign", run.stage, str(recipe), "--overwrite"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
    metrics = out / run.stage / "metrics.jsonl"
    if done.returncode != 0 or not metrics.exists():
        return {"error": f"exit {done.returncode}"}, wall, tail
    records = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    return summarize(records, sizes.warmup), wall, tail


def render(rows: list[tuple[Run, dict, float]], header: dict, sizes: Sizes, peak_tflops: float | None) -> str:
    from qalign.memory import CUDA_CONTEXT

    lines = [
        "| model | stage | dtype | tokens/s | MFU | measured peak GiB | plan GiB | plan - CUDA context GiB "
        "| measured / (plan - context) | last loss | wall s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run, result, wall in rows:
        if "error" in result:
            lines.append(
                f"| {run.model} | {run.label} | {run.dtype} | failed: {result['error']} |||||||| {wall:.0f} |"
            )
            continue
        seq = sizes.sft_length if run.stage == "sft" else 2 * sizes.dpo_length
        speed, peak, plan = result["tokens_per_s"], result["peak_bytes"], result["plan_bytes"]
        mfu = (
            f"{speed * flops_per_token(run.model, seq) / (peak_tflops * 1e12):.1%}"
            if speed and peak_tflops
            else "-"
        )
        net = plan - CUDA_CONTEXT if plan and result["peak_kind"] == "cuda_max_allocated" else plan

        def gib(value: float | None) -> str:
            return f"{value / GiB:.2f}" if value else "-"

        # On a CPU the peak is the process's RSS (libraries included), which the plan does not model.
        ratio = f"{peak / net:.2f}" if peak and net and result["peak_kind"] == "cuda_max_allocated" else "-"
        loss = f"{result['last_loss']:.3f}" if result["last_loss"] is not None else "-"
        lines.append(
            f"| {run.model} | {run.label} | {run.dtype} | {speed:.0f} | {mfu} | {gib(peak)} | {gib(plan)} "
            f"| {gib(net)} | {ratio} | {loss} | {wall:.0f} |"
        )
    facts = "\n".join(f"- {key}: {value}" for key, value in header.items())
    return (
        "# qalign on a GPU: throughput and memory against the plan\n\n"
        f"{facts}\n\n" + "\n".join(lines) + "\n\n"
        "- tokens/s: the CLI's per-step `tokens_per_s` (input tokens of the step over its wall time), median of "
        f"the steps after the first {sizes.warmup}\n"
        "- MFU: tokens/s x model FLOPs per token (forward and backward of the decoder's linears and the head, "
        "causal attention; gradient checkpointing's recomputation not counted) / the device's dense peak\n"
        "- measured peak: `peak_memory_bytes` of metrics.jsonl's final record (`torch.cuda.max_memory_allocated` on "
        "a GPU, which excludes the CUDA context); plan: its `plan_total_bytes`, which includes "
        "the context, hence the column without it\n"
    )


def device_header(cpu: bool, sizes: Sizes, command: str) -> dict:
    import bitsandbytes
    import peft
    import torch
    import transformers

    device = "cpu" if cpu else torch.cuda.get_device_name(0)
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}",
        "command": f"`{command}`",
        "workload": f"random weights in each model's shape, NF4 + double quant, LoRA r=16 on all linear layers, "
        f"batch 1, gradient checkpointing on, activation offloading off unless the stage says so, {sizes.steps} steps; SFT rows of about {sizes.sft_length} tokens, "
        f"DPO sides of about {sizes.dpo_length} (one pair row of about {2 * sizes.dpo_length}), cached reference",
    }


def peak_for(device: str, override: float | None) -> float | None:
    if override is not None:
        return override
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in device), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model and a few short steps (smoke test)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (with --tiny: no GPU needed)")
    parser.add_argument("--skip-8b", action="store_true", help="only the 1B runs")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=HERE / "GPU_RESULTS.md")
    args = parser.parse_args(argv)
    problem = check_imports(args.cpu)
    if problem:
        print(f"gpu_check: {problem}", file=sys.stderr)
        return 2
    import tempfile

    sizes = SMOKE if args.tiny else FULL
    runs = runs_for(args.tiny, args.skip_8b)
    command = "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = device_header(args.cpu, sizes, command.strip())
    peak_tflops = peak_for(header["device"], args.peak_tflops)
    with tempfile.TemporaryDirectory(prefix="qalign-gpu-check-") as tmp:
        work = args.work or Path(tmp)
        write_data(work / "data", sizes, examples=sizes.steps + 2)
        rows: list[tuple[Run, dict, float]] = []
        for run in runs:
            print(f"gpu_check: {run.model} {run.label} {run.dtype} ...", flush=True)
            result, wall, tail = execute(run, work, sizes, args.cpu)
            if "error" in result:
                print(f"gpu_check: {run.model} {run.label} {run.dtype} failed:\n{tail}", file=sys.stderr)
            rows.append((run, result, wall))
            args.out.write_text(render(rows, header, sizes, peak_tflops), encoding="utf-8")
    print(args.out.read_text(encoding="utf-8"))
    return 1 if any("error" in result for _, result, _ in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
