"""End to end: the `qalign` command on tiny 4-bit models, as a user runs it. Most runs are in-process (imports
and model loads are paid once per test session); signals, kills and the entry point itself use real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import write_jsonl, write_recipe

QALIGN = [sys.executable, "-m", "qalign"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
ENV = {**os.environ, **OFFLINE}


def qalign_process(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m qalign ARGS` in a real process: for what only a process shows (exit status, every line on stderr)."""
    return subprocess.run([*QALIGN, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def qalign(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`qalign ARGS` run in this process from `cwd`, answered as `qalign_process` answers: exit code, stdout, stderr.

    An exception that escapes the command is raised here rather than turned into exit code 1, so a traceback can
    never pass for a clean error. Warnings are written to stderr, as the real process would print them."""
    import warnings

    from typer.testing import CliRunner

    from qalign.cli import app

    def show(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    before = Path.cwd()
    os.chdir(cwd)
    try:
        with warnings.catch_warnings():
            # Python's default filters plus the CLI's own (pytest replaces both for the duration of a test).
            warnings.resetwarnings()
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.showwarning = show
            result = CliRunner().invoke(app, list(args), env=OFFLINE, catch_exceptions=False)
    finally:
        os.chdir(before)
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def metrics(run: Path) -> list[dict]:
    path = run / "sft" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def adapter_bytes(run: Path) -> bytes:
    return (run / "sft" / "adapter" / "adapter_model.safetensors").read_bytes()


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"qalign exited early ({proc.returncode}):\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model):
    """One uninterrupted run of the reference recipe (12 steps, checkpoints every 4, eval every 6)."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    recipe = write_recipe(folder, tiny_model("llama"))
    result = qalign("sft", str(recipe), cwd=folder)
    assert result.returncode == 0, result.stderr
    return folder, recipe, result


def test_sft_trains_and_writes_every_output(finished_run):
    folder, _recipe, result = finished_run
    run = folder / "runs" / "tiny"
    records = [r for r in metrics(run) if not r.get("final")]
    assert [r["step"] for r in records] == list(range(1, 13))
    for record in records:
        assert {"step", "loss", "lr", "tokens_per_s", "epoch"} <= record.keys()
        assert record["tokens_per_s"] > 0
    # The loss falls: the last steps average clearly below the first.
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-3:]) / 3
    assert last < first - 0.3, (first, last)
    evaluated = [r["step"] for r in records if "eval_loss" in r]
    assert evaluated == [6, 12]
    assert records[-1]["eval_loss"] < records[5]["eval_loss"]
    # Outputs: adapter with tokenizer, resolved recipe with absolute paths, checkpoints pruned to the last 2.
    adapter = run / "sft" / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {
        p.name for p in adapter.iterdir()
    }
    resolved = yaml.safe_load((run / "sft" / "recipe.yaml").read_text())
    assert Path(resolved["sft"]["data"]["train"]).is_absolute()
    assert resolved["sft"]["scheduler"] == "cosine"  # defaults are filled in
    assert sorted(p.name for p in (run / "sft" / "checkpoints").glob("step-*")) == ["step-12", "step-8"]
    assert "trainable" in result.stdout and "MiB" in result.stdout


def test_adapter_loads_with_peft_and_changes_the_model(finished_run, tiny_model):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    folder, _, _ = finished_run
    adapter = folder / "runs" / "tiny" / "sft" / "adapter"
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    base = AutoModelForCausalLM.from_pretrained(
        tiny_model("llama"), quantization_config=quant, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 3 + 4?"}], add_generation_prompt=True, return_tensors="pt"
    )["input_ids"]
    with torch.no_grad():
        before = base(input_ids=ids).logits
        model = PeftModel.from_pretrained(base, adapter)
        after = model(input_ids=ids).logits
    assert not torch.allclose(before, after, atol=1e-4)


def test_killed_run_resumes_to_identical_weights(finished_run, tmp_path, tiny_model):
    reference, _, _ = finished_run
    recipe = write_recipe(tmp_path, tiny_model("llama"))
    run = tmp_path / "runs" / "tiny"
    proc = subprocess.Popen([*QALIGN, "sft", str(recipe)], cwd=tmp_path, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    # Kill -9 right after the step-4 checkpoint, i.e. in the middle of step 5 or 6.
    wait_for(lambda: (run / "sft" / "checkpoints" / "step-4").exists(), proc)
    proc.kill()
    proc.communicate()
    assert not (run / "sft" / "adapter").exists()

    resumed = qalign("sft", str(recipe), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout and "step-4" in resumed.stdout
    assert adapter_bytes(run) == adapter_bytes(reference / "runs" / "tiny")
    losses = [(r["step"], r["loss"]) for r in metrics(run) if not r.get("final")]
    assert losses == [
        (r["step"], r["loss"]) for r in metrics(reference / "runs" / "tiny") if not r.get("final")
    ]


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tmp_path, tiny_model):
    # Steps of one short row: the run is long enough to interrupt, and its resume is quick on a busy machine.
    recipe = write_recipe(
        tmp_path, tiny_model("llama"), max_steps=60, batch_size=1, grad_accum=1, save_every=0, eval_every=0
    )
    run = tmp_path / "runs" / "tiny"
    proc = subprocess.Popen([*QALIGN, "sft", str(recipe)], cwd=tmp_path, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    metrics_file = run / "sft" / "metrics.jsonl"
    wait_for(lambda: metrics_file.exists() and metrics_file.read_text().count("\n") >= 2, proc)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    saved = sorted((run / "sft" / "checkpoints").glob("step-*"))
    assert len(saved) == 1
    step = int(saved[0].name.split("-")[1])
    assert 2 <= step < 60

    resumed = qalign("sft", str(recipe), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"step {step} of 60" in resumed.stdout
    assert [r["step"] for r in metrics(run) if not r.get("final")] == list(range(1, 61))


def test_rerun_is_a_no_op_and_start_over_protects_the_adapter(tmp_path, tiny_model):
    recipe = write_recipe(tmp_path, tiny_model("llama"), max_steps=2)
    run = tmp_path / "runs" / "tiny"
    assert qalign("sft", str(recipe), cwd=tmp_path).returncode == 0
    finished = adapter_bytes(run)

    again = qalign("sft", str(recipe), cwd=tmp_path)
    assert again.returncode == 0 and "already complete" in again.stdout

    refused = qalign("sft", str(recipe), "--no-resume", cwd=tmp_path)
    assert refused.returncode == 2
    assert "--overwrite" in refused.stderr and "Traceback" not in refused.stderr
    assert adapter_bytes(run) == finished

    longer = qalign(
        "sft", str(recipe), "--no-resume", "--overwrite", "--set", "sft.max_steps=3", cwd=tmp_path
    )
    assert longer.returncode == 0, longer.stderr
    assert [r["step"] for r in metrics(run) if not r.get("final")] == [1, 2, 3]
    assert adapter_bytes(run) != finished


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_other_architectures_train(tmp_path, tiny_model, arch):
    recipe = write_recipe(tmp_path, tiny_model(arch), max_steps=3, gradient_checkpointing=False)
    result = qalign("sft", str(recipe), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    records = [r for r in metrics(tmp_path / "runs" / "tiny") if not r.get("final")]
    assert len(records) == 3 and all(r["loss"] > 0 for r in records)


def test_fp4_and_unquantized_bases_train(tmp_path, tiny_model):
    for quantization in ("fp4", "none"):
        folder = tmp_path / quantization
        recipe = write_recipe(folder, tiny_model("llama"), max_steps=2)
        result = qalign("sft", str(recipe), "--set", f"model.quantization={quantization}", cwd=folder)
        assert result.returncode == 0, result.stderr
        assert f"({quantization}," in result.stdout


def test_validate_prints_statistics_and_dumps_tokens(tmp_path, tiny_model):
    recipe = write_recipe(tmp_path, tiny_model("llama"))
    dump = tmp_path / "dump.jsonl"
    result = qalign("validate", str(recipe), "--dump", str(dump), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "32 of 32 rows kept" in result.stdout and "p90" in result.stdout
    assert "The answer is 0." in result.stdout  # the rendered example
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(rows) == 40
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"])
        trained = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
        assert trained and all(
            label in (-100, t) for t, label in zip(row["input_ids"], row["labels"], strict=True)
        )
    assert not (tmp_path / "runs").exists()  # validation trains nothing and writes no run


def test_user_errors_exit_2_with_one_line_and_no_traceback(tmp_path, tiny_model):
    recipe = write_recipe(tmp_path, tiny_model("llama"))
    cases = [
        (["--set", "sft.lrr=1"], "did you mean 'sft.lr'"),
        (["--set", "sft.batch_size=0"], "sft.batch_size"),
        (["--set", "model.base=./no-such-model"], "model.base"),
        (["--set", "sft.data.train=data/missing.jsonl"], "data/missing.jsonl"),
    ]
    # The first through a real process: nothing at all (a warning, a library's log line) reaches its stderr.
    for run, (extra, expected) in zip([qalign_process, qalign, qalign, qalign], cases, strict=True):
        result = run("sft", str(recipe), *extra, cwd=tmp_path)
        assert result.returncode == 2, (extra, result.stderr)
        assert expected in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr

    write_jsonl(tmp_path / "data" / "train.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    result = qalign("sft", str(recipe), cwd=tmp_path)
    assert result.returncode == 2
    assert "train.jsonl:1" in result.stderr and "no assistant turn" in result.stderr
    assert not (tmp_path / "runs" / "tiny" / "sft" / "checkpoints").exists()


def test_refuses_an_output_dir_that_is_not_a_run(tmp_path, tiny_model):
    recipe = write_recipe(tmp_path, tiny_model("llama"), max_steps=1)
    precious = tmp_path / "runs" / "tiny" / "thesis.txt"
    precious.parent.mkdir(parents=True)
    precious.write_text("do not touch")
    result = qalign("sft", str(recipe), cwd=tmp_path)
    assert result.returncode == 2 and "not a qalign run" in result.stderr
    assert sorted(p.name for p in precious.parent.iterdir()) == ["thesis.txt"]


def test_version_and_help():
    from qalign import __version__

    result = subprocess.run([*QALIGN, "--version"], env=ENV, capture_output=True, text=True)
    assert result.returncode == 0 and __version__ in result.stdout
    result = subprocess.run([*QALIGN, "--help"], env=ENV, capture_output=True, text=True)
    assert result.returncode == 0 and "sft" in result.stdout and "validate" in result.stdout


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path, tiny_model):
    # Steps of one short row: the run is long enough to interrupt, and its resume is quick on a busy machine.
    recipe = write_recipe(
        tmp_path, tiny_model("llama"), max_steps=60, batch_size=1, grad_accum=1, save_every=0, eval_every=0
    )
    run = tmp_path / "runs" / "tiny"
    proc = subprocess.Popen([*QALIGN, "sft", str(recipe)], cwd=tmp_path, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    metrics_file = run / "sft" / "metrics.jsonl"
    wait_for(lambda: metrics_file.exists() and metrics_file.read_text().count("\n") >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "SIGTERM" in err and "Traceback" not in err
    assert len(list((run / "sft" / "checkpoints").glob("step-*"))) == 1
