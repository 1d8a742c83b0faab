"""Never lose a run: kills at random moments, changed recipes on resume, non-finite losses; and validators that
never raise anything but a clean UserError, whatever they are fed."""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import yaml
from conftest import write_recipe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli_sft import ENV, QALIGN, metrics, qalign

from qalign.data import Row, detect_format, to_messages
from qalign.dpo import split_preference
from qalign.errors import UserError
from qalign.recipe_load import parse_recipe


def adapter_bytes(folder: Path) -> bytes:
    return (folder / "runs" / "tiny" / "sft" / "adapter" / "adapter_model.safetensors").read_bytes()


def test_sigkill_at_random_moments_still_ends_bit_identical(tmp_path, tiny_model):
    """Checkpoints every step, so many kills land inside a checkpoint write; each restart resumes from the
    last complete checkpoint, and the final adapter equals an uninterrupted run's byte for byte."""
    reference = tmp_path / "reference"
    recipe = write_recipe(reference, tiny_model("llama"), save_every=1, eval_every=0)
    assert qalign("sft", str(recipe), cwd=reference).returncode == 0

    folder = tmp_path / "killed"
    recipe = write_recipe(folder, tiny_model("llama"), save_every=1, eval_every=0)
    checkpoints = folder / "runs" / "tiny" / "sft" / "checkpoints"
    rng = random.Random(7)
    kills = 0
    while kills < 4:
        proc = subprocess.Popen([*QALIGN, "sft", str(recipe)], cwd=folder, env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        # Wait until training is under way (a new checkpoint appears), then kill at a random moment.
        before = len(list(checkpoints.glob("step-*"))) if checkpoints.exists() else 0
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if checkpoints.exists() and (
                list(checkpoints.glob(".tmp-*")) or len(list(checkpoints.glob("step-*"))) > before
            ):
                break
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.6))
        if proc.poll() is not None:
            break
        proc.kill()
        proc.communicate()
        kills += 1
    result = qalign("sft", str(recipe), cwd=folder)
    assert result.returncode == 0, result.stderr
    assert kills >= 2
    assert adapter_bytes(folder) == adapter_bytes(reference)
    steps = [r["step"] for r in metrics(folder / "runs" / "tiny") if not r.get("final")]
    assert steps == list(range(1, 13))


def test_resume_with_a_changed_recipe_is_refused_then_forced(tmp_path, tiny_model):
    recipe = write_recipe(tmp_path, tiny_model("llama"), max_steps=2)
    assert qalign("sft", str(recipe), cwd=tmp_path).returncode == 0
    stage = tmp_path / "runs" / "tiny" / "sft"
    import shutil

    shutil.rmtree(stage / "adapter")  # as if the run had died before writing it
    resolved = (stage / "recipe.yaml").read_text()
    refused = qalign("sft", str(recipe), "--set", "sft.lr=0.001", cwd=tmp_path)
    assert refused.returncode == 2
    assert "sft.lr: 0.005 -> 0.001" in refused.stderr and "--force-resume" in refused.stderr
    assert (stage / "recipe.yaml").read_text() == resolved  # untouched
    # Bookkeeping keys do not block a resume.
    ok = qalign("sft", str(recipe), "--set", "sft.save_every=7", "--set", "sft.log_every=3", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    shutil.rmtree(stage / "adapter")
    forced = qalign("sft", str(recipe), "--set", "sft.lr=0.001", "--force-resume", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert "despite changes" in forced.stderr


def test_resume_refuses_a_checkpoint_trained_in_another_resolved_dtype(tmp_path, tiny_model):
    import json
    import shutil

    # compute_dtype: auto resolves per machine; fake a checkpoint from a machine where it resolved elsewhere.
    recipe = write_recipe(tmp_path, tiny_model("llama"), max_steps=2)
    assert qalign("sft", str(recipe), cwd=tmp_path).returncode == 0
    stage = tmp_path / "runs" / "tiny" / "sft"
    shutil.rmtree(stage / "adapter")
    state_file = next((stage / "checkpoints").glob("step-*")) / "trainer_state.json"
    state = json.loads(state_file.read_text())
    here = state["identity"]["model"]["resolved_compute_dtype"]
    assert here in ("fp32", "bf16")
    other = "fp16"
    state["identity"]["model"]["resolved_compute_dtype"] = other
    state_file.write_text(json.dumps(state))
    refused = qalign("sft", str(recipe), cwd=tmp_path)
    assert refused.returncode == 2
    assert f"model.resolved_compute_dtype: '{other}' -> '{here}'" in refused.stderr


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model):
    # An absurd learning rate: step 1 is finite, the weights then overflow and step 2's loss is not.
    recipe = write_recipe(tmp_path, tiny_model("llama"), max_steps=6, save_every=1, lr=1e30, eval_every=0)
    result = qalign("sft", str(recipe), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "stopped:" in result.stderr and "step 2" in result.stderr and "step-1" in result.stderr
    assert "Traceback" not in result.stderr
    checkpoints = sorted(p.name for p in (tmp_path / "runs" / "tiny" / "sft" / "checkpoints").glob("step-*"))
    assert checkpoints == ["step-1"]
    assert not (tmp_path / "runs" / "tiny" / "sft" / "adapter").exists()

    skipped = qalign("sft", str(recipe), "--no-resume", "--set", "sft.nan_policy=skip", cwd=tmp_path)
    assert skipped.returncode == 0, skipped.stderr
    records = [r for r in metrics(tmp_path / "runs" / "tiny") if not r.get("final")]
    assert [r.get("skipped", False) for r in records] == [False] + [True] * 5
    assert records[-1]["skipped_steps"] == 5


# -- validators under random input -------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
keys = st.sampled_from(
    ["messages", "conversations", "role", "content", "from", "value", "instruction", "input", "output", "prompt",
     "completion", "chosen", "rejected", "system"]
)  # fmt: skip
messageish = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["user", "assistant", "system", "tool", 3]) | json_values,
        "content": st.text(max_size=10) | json_values,
    },
)
rows = st.dictionaries(
    keys, json_values | st.lists(messageish, max_size=5) | st.text(max_size=10), max_size=4
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows)
def test_data_validators_raise_only_user_errors(data):
    row = Row("random.jsonl:1", data)
    for fmt in ("auto", "messages", "sharegpt", "alpaca", "prompt_completion"):
        try:
            detected = detect_format([row], fmt)
            messages = to_messages(row, detected)
            assert messages and all(isinstance(m["content"], str) for m in messages)
        except UserError as exc:
            assert "random.jsonl:1" in str(exc)
    try:
        split_preference(row)
    except UserError as exc:
        assert "random.jsonl:1" in str(exc)


recipe_keys = st.sampled_from(
    ["name", "output_dir", "seed", "model", "lora", "sft", "dpo", "merge", "base", "r", "lr", "data", "train",
     "batch_size", "max_length", "quantization", "beta", "loss", "bogus"]
)  # fmt: skip
recipes = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: st.dictionaries(recipe_keys, children, max_size=5) | st.lists(children, max_size=3),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recipes)
def test_recipe_validation_raises_only_user_errors(tmp_path_factory, raw):
    folder = tmp_path_factory.mktemp("r", numbered=True)
    text = yaml.safe_dump(raw) if not isinstance(raw, str) else raw
    try:
        parse_recipe(text, folder / "recipe.yaml", [])
    except UserError as exc:
        assert "recipe.yaml" in str(exc) or "--set" in str(exc)


def test_metrics_file_survives_a_torn_last_line(tmp_path, tiny_model):
    recipe = write_recipe(tmp_path, tiny_model("llama"), max_steps=3, save_every=1)
    first = qalign("sft", str(recipe), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    metrics_file = tmp_path / "runs" / "tiny" / "sft" / "metrics.jsonl"
    import shutil

    shutil.rmtree(tmp_path / "runs" / "tiny" / "sft" / "adapter")
    shutil.rmtree(tmp_path / "runs" / "tiny" / "sft" / "checkpoints" / "step-3")
    (tmp_path / "runs" / "tiny" / "sft" / "checkpoints" / "latest").write_text("step-3")
    with metrics_file.open("a") as handle:
        handle.write('{"step": 4, "loss": 1.')  # a crash mid-append
    result = qalign("sft", str(recipe), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    assert [r["step"] for r in lines if not r.get("final")] == [1, 2, 3]
