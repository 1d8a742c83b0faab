"""benchmarks/gpu_check.py without a GPU: its helpers by hand, and its --tiny --cpu smoke run end to end."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from qalign.memory import CUDA_CONTEXT
from qalign.recipe_load import parse_recipe

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check


def test_runs_put_the_quick_answers_first():
    runs = gpu_check.runs_for(tiny=False, skip_8b=False)
    assert [(r.model.split("/")[-1], r.label, r.dtype) for r in runs] == [
        ("Llama-3.2-1B", "sft", "bf16"),
        ("Llama-3.2-1B", "dpo", "bf16"),
        ("Llama-3.2-1B", "sft", "fp16"),
        ("Llama-3.1-8B", "sft", "bf16"),
        ("Llama-3.1-8B", "dpo", "bf16"),
        ("Llama-3.1-8B", "dpo + offloading", "bf16"),
    ]
    assert len(gpu_check.runs_for(tiny=False, skip_8b=True)) == 3


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_generated_recipes_are_valid_and_say_what_the_results_claim(tmp_path, stage):
    (tmp_path / "model").mkdir()
    (tmp_path / "data" / stage).mkdir(parents=True)
    (tmp_path / "data" / stage / f"{stage}.jsonl").write_text("{}\n")
    run = gpu_check.Run("meta-llama/Llama-3.2-1B", stage, "fp16")
    text = gpu_check.recipe_text(run, tmp_path / "model", tmp_path / "data", tmp_path / "out", gpu_check.FULL)
    recipe = parse_recipe(text, tmp_path / "recipe.yaml", [])
    spec = getattr(recipe, stage)
    assert (spec.batch_size, spec.gradient_checkpointing, spec.max_steps) == (1, True, gpu_check.FULL.steps)
    assert spec.activation_offloading is False  # never left to auto, which would decide by the GPU's size
    offloaded = gpu_check.recipe_text(
        gpu_check.Run(run.model, stage, "bf16", offload=True),
        tmp_path / "model",
        tmp_path / "data",
        tmp_path,
        gpu_check.FULL,
    )
    assert getattr(parse_recipe(offloaded, tmp_path / "recipe.yaml", []), stage).activation_offloading is True
    assert spec.max_length == (2048 if stage == "sft" else 1024)
    assert (recipe.model.compute_dtype, recipe.lora.r, recipe.lora.target_modules) == (
        "fp16",
        16,
        "all-linear",
    )


def test_flops_per_token_by_hand():
    # tiny: per layer q and o 64 x 64 (x2), k and v 64 x 32 (x2), gate, up and down 64 x 128 (x3) = 36,864
    # weights; two layers and a 64 x 4096 head = 335,872, 4 FLOPs each; attention 6 * 2 layers * 64 wide = 768
    # per token of context.
    assert gpu_check.flops_per_token("tiny", 100) == 4 * 335_872 + 768 * 100
    # Llama 3.1 8B: 8.03 B parameters, the 0.525 B-row input embedding not multiplied: ~30 GFLOP per token.
    assert gpu_check.flops_per_token("meta-llama/Llama-3.1-8B", 0) == pytest.approx(
        4 * (8.03e9 - 0.525e9), 0.01
    )


def test_summary_takes_steps_after_warmup_and_the_final_record():
    records = [
        {"step": i, "tokens_per_s": speed, "loss": 2.0 - i / 10} for i, speed in enumerate([1, 9, 10, 30], 1)
    ]
    records.append(
        {"step": 4, "final": True, "peak_memory_bytes": 3 * 2**30, "peak_memory_kind": "cuda_max_allocated"}
        | {"plan_total_bytes": 4 * 2**30}
    )
    summary = gpu_check.summarize(records, warmup=1)
    assert summary["tokens_per_s"] == 10 and summary["steps"] == 4
    assert (summary["peak_bytes"], summary["plan_bytes"], summary["last_loss"]) == (3 * 2**30, 4 * 2**30, 1.6)
    table = gpu_check.render(
        [(gpu_check.Run("tiny", "sft", "bf16"), summary, 12.0)], {}, gpu_check.SMOKE, 100.0
    )
    ratio = 3 * 2**30 / (4 * 2**30 - CUDA_CONTEXT)
    assert f"| {ratio:.2f} |" in table
    mfu = 10 * gpu_check.flops_per_token("tiny", gpu_check.SMOKE.sft_length) / 100e12
    assert f"| {mfu:.1%} |" in table


def test_a_missing_gpu_is_said_plainly():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gpu_check.check_imports(cpu=True) is None
    assert "no CUDA device" in gpu_check.check_imports(cpu=False)
    assert gpu_check.main(["--out", "/nonexistent/x.md"]) == 2


@pytest.mark.slow
def test_tiny_cpu_smoke_run_writes_the_results(tmp_path):
    out = tmp_path / "GPU_RESULTS.md"
    assert gpu_check.main(["--tiny", "--cpu", "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| tiny |")]
    assert [row.split(" | ")[1:3] for row in rows] == [
        ["sft", "fp32"],
        ["dpo", "fp32"],
        ["dpo + offloading", "fp32"],
    ]
    assert all("failed" not in row for row in rows)
