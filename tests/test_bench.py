"""Smoke test of the benchmark harness: one short qalign measurement (and TRL's when it is installed) on a tiny
model, so the benchmark keeps working as qalign changes. CI does not install the bench extra."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def bench_module(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    setup = bench_module("bench_setup")
    build_model, write_data = setup.build_model, setup.write_data
    root = tmp_path_factory.mktemp("bench")
    build_model("tiny", root / "model")
    write_data(root / "data", n=6, prompt_words=6, response_words=6)
    return root


def measure(root: Path, tool: str, stage: str, mode: str) -> dict:
    out = root / f"{tool}-{stage}-{mode}.json"
    command = [
        sys.executable,
        str(BENCH / "bench_worker.py"),
        "--tool",
        tool,
        "--stage",
        stage,
        "--mode",
        mode,
    ]
    command += [
        "--model",
        str(root / "model"),
        "--data",
        str(root / "data"),
        "--workdir",
        str(root / "w" / out.stem),
    ]
    command += ["--out", str(out), "--steps", "3", "--warmup", "1", "--batch-size", "2", "--max-length", "64"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("tool", ["qalign", "trl"])
def test_worker_measures_dpo(inputs: Path, tool: str) -> None:
    if tool == "trl" and importlib.util.find_spec("trl") is None:
        pytest.skip("the bench extra (trl) is not installed")
    result = measure(inputs, tool, "dpo", "defaults")
    # 2 pairs a step, chosen and rejected the same length: every step counts the same tokens.
    assert len(set(result["step_tokens"])) == 1 and result["timed_steps"] == 2
    assert result["tokens_per_s"] > 0 and result["peak_mib"] > 0
    # Training memory is measured from the first step on, apart from loading: above a positive baseline,
    # and below the whole process's peak.
    assert result["baseline_mib"] > 0 and 0 <= result["train_mib"] < result["peak_mib"]
    # Start-up: from the process's start to the first step's beginning, then its end; the timed stages and
    # `other` add up to the first.
    assert 0 < result["startup_s"] < result["first_step_s"] < result["process_s"] + 60
    assert sum(result["phases"].values()) == pytest.approx(result["startup_s"], rel=0.05)
    assert result["phases"]["interpreter, torch import"] > 0
    if tool == "qalign":
        # The reference pass runs once, before training, and its share lowers the wall-clock figure.
        assert result["precompute_s"] > 0 and result["tokens_per_s"] < result["tokens_per_s_train"]
        assert result["settings"]["reference"] == "precompute"
        assert result["phases"]["reference pass"] == result["precompute_s"]
        for stage in ("qalign imports", "data (read, render, check)", "model (load, quantize, LoRA)"):
            assert result["phases"][stage] > 0, stage


def test_mixed_workload_lengths(tmp_path: Path) -> None:
    setup = bench_module("bench_setup")
    stats = setup.write_data(tmp_path / "a", n=40, prompt_words=6, response_words=6, workload="mixed")
    again = setup.write_data(tmp_path / "b", n=40, prompt_words=6, response_words=6, workload="mixed")
    # A fixed seed: the same data every run.
    assert (tmp_path / "a" / "dpo.jsonl").read_text() == (tmp_path / "b" / "dpo.jsonl").read_text()
    assert stats == again
    low, high = setup.MIXED_RANGE
    rows = [json.loads(line) for line in (tmp_path / "a" / "dpo.jsonl").read_text().splitlines()]
    parts = [len(row[key].split()) for row in rows for key in ("prompt", "chosen", "rejected")]
    assert low <= min(parts) and max(parts) <= high and len(set(parts)) > 10
    # Chosen and rejected differ in length, so a pair pads one of them.
    assert sum(len(r["chosen"].split()) != len(r["rejected"].split()) for r in rows) > len(rows) // 2
    # Skewed: most parts short, a long tail.
    assert sorted(parts)[len(parts) // 2] < (low + high) / 2 < max(parts)
    sft = [json.loads(line) for line in (tmp_path / "a" / "sft.jsonl").read_text().splitlines()]
    longest = max(sum(len(m["content"].split()) for m in row["messages"]) for row in sft)
    assert stats["max_words"] >= longest and stats["min_words"] >= 2 * low
    uniform = setup.write_data(tmp_path / "u", n=4, prompt_words=6, response_words=5)
    assert uniform["min_words"] == uniform["max_words"] == 11


def test_cpu_facts() -> None:
    report = bench_module("bench_report")
    facts = report.cpu_facts("model name\t: Some CPU\nflags\t\t: fpu avx2 avx512f amx_tile\n")
    assert facts["cpu_model"] == "Some CPU"
    assert facts["cpu_flags"] == {
        "avx512_bf16": False,
        "amx_bf16": False,
        "amx_tile": True,
        "avx512f": True,
        "avx2": True,
    }
    # Without /proc/cpuinfo the flags are unknown, not absent.
    assert set(report.cpu_facts(None)["cpu_flags"].values()) == {None}


def fake_entry(tokens_per_s: float, startup_s: float, phases: dict) -> dict:
    return {
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_train": tokens_per_s,
        "peak_mib": 500.0,
        "train_mib": 100.0,
        "precompute_s": 0.0,
        "startup_s": startup_s,
        "first_step_s": startup_s + 1,
        "startup_clock": "its start time in /proc/self/stat",
        "phases": phases,
        "settings": {"compute_dtype": "auto (bfloat16)"},
        "memory": "peak RSS",
        "device": "cpu",
        "reps": 1,
        "step_tokens": 100,
    }


def bench_args(**chosen: object) -> argparse.Namespace:
    """What bench.py's parser gives the report: a tiny run, the rest as `chosen` says."""
    fixed = dict(reps=1, steps=4, warmup=1, batch_size=4, grad_accum=1, prompt_words=8, response_words=8)
    return argparse.Namespace(**fixed, peak_tflops=None, **chosen)


def assert_tables_well_formed(text: str) -> None:
    """Every markdown table row has as many cells as its header."""
    for block in text.split("\n\n"):
        rows = [line for line in block.splitlines() if line.startswith("|")]
        assert len({row.count("|") for row in rows}) <= 1, block


TINY_MODEL = {"name": "tiny", "architecture": "LlamaConfig", "parameters": 2e5, "non_embedding": 1e5}


def test_results_show_cpu_workloads_and_startup() -> None:
    report = bench_module("bench_report")
    args = bench_args(
        stages=["sft"], modes=["gc-on", "defaults"], mixed_modes=["defaults"], workloads=["uniform", "mixed"]
    )
    ours = {"qalign imports": 5.0, "model (load, quantize, LoRA)": 0.5, "other": 0.5}
    summary = {
        (tool, "sft", mode, workload): fake_entry(
            speed, startup, ours if tool == "qalign" else {"other": 7.0}
        )
        for tool, speed, startup in (("qalign", 300.0, 6.0), ("trl", 100.0, 7.0))
        for mode, workload in (("gc-on", "uniform"), ("defaults", "uniform"), ("defaults", "mixed"))
    }
    workloads = {
        "uniform": {"workload": "uniform", "min_words": 16, "median_words": 16, "max_words": 16},
        "mixed": {"workload": "mixed", "min_words": 20, "median_words": 90, "max_words": 400},
    }
    text = report.render_results(summary, args, TINY_MODEL, ["bench.py"], workloads)
    assert "- CPU: " in text and "resolves to" in text and "hold for this CPU" in text
    assert "`mixed`: each prompt, response, chosen and rejected its own length" in text
    assert "| mixed | sft | defaults | 300 | 100 | **3.00x** |" in text
    assert "| uniform | sft | gc-on | 6.0 | 7.0 | 0.86x | 7.0 | 8.0 | 0.88x |" in text
    assert "| workload | stage | mode | qalign imports | model (load, quantize, LoRA) | other |" in text
    assert_tables_well_formed(text)
    assert "| sft | gc-on | #22 | 1.5x | 3.00x | 1.00x | yes |" in text
    assert "Emulated" not in text and "fp32 adapters" not in text
    table = report.results_table(summary, args, TINY_MODEL)
    assert [c.header for c in table.columns][:4] == ["workload", "stage", "mode", "tool"]
    assert "to 1st step s" in [c.header for c in table.columns]


def test_results_of_an_emulated_cpu_show_it_and_what_trls_adapter_cast_costs() -> None:
    report = bench_module("bench_report")
    args = bench_args(stages=["dpo"], modes=["gc-on"], mixed_modes=[], workloads=["uniform"], cpu_kind="avx2")
    summary = {
        (kind, "dpo", "gc-on", "uniform"): fake_entry(speed, 6.0, {"other": 1.0})
        for kind, speed in (("qalign", 600.0), ("trl", 200.0), ("trl-fp32-adapters", 400.0))
    }
    workloads = {"uniform": {"workload": "uniform", "min_words": 16, "median_words": 16, "max_words": 16}}
    text = report.render_results(summary, args, TINY_MODEL, ["bench.py", "--cpu-kind", "avx2"], workloads)
    emulation = "ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2"
    assert f"**Emulated AVX2-only CPU** ({emulation})" in text
    assert "| dpo | gc-on | 200 | 400 | 600 | **3.00x** | **1.50x** |" in text
    assert "| dpo | gc-on | #22 | 3.0x | 3.00x | 1.00x | yes |" in text
    assert_tables_well_formed(text)
