"""Smoke test of the benchmark harness: one short qalign measurement (and TRL's when it is installed) on a tiny
model, so the benchmark keeps working as qalign changes. CI does not install the bench extra."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sys.path.insert(0, str(BENCH))
    try:
        from bench_setup import build_model, write_data
    finally:
        sys.path.remove(str(BENCH))
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
    if tool == "qalign":
        # The reference pass runs once, before training, and its share lowers the wall-clock figure.
        assert result["precompute_s"] > 0 and result["tokens_per_s"] < result["tokens_per_s_train"]
        assert result["settings"]["reference"] == "precompute"
