"""The run folder never lies and never loses: stale stages, refusals that leave every byte, the run lock, and
re-runs with changed inputs."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import add_dpo, write_jsonl, write_recipe
from test_cli_sft import qalign


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with a digest of its bytes (the lock file aside: holding it writes a pid)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".qalign-lock"
    }


def test_a_refusal_leaves_every_file_as_it_was(tmp_path, tiny_model):
    recipe = write_recipe(tmp_path, tiny_model("llama"), max_steps=2, eval_every=0)
    run = tmp_path / "runs" / "tiny"
    assert qalign("sft", str(recipe), cwd=tmp_path).returncode == 0
    before = snapshot(run)
    assert any(name.startswith("sft/checkpoints/") for name in before)

    refused = qalign("sft", str(recipe), "--no-resume", cwd=tmp_path)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    assert snapshot(run) == before
    # The refused command left a run that still reads as complete.
    again = qalign("sft", str(recipe), cwd=tmp_path)
    assert again.returncode == 0 and "already complete" in again.stdout
    assert snapshot(run) == before


def test_a_finished_run_with_changed_inputs_is_refused_naming_the_change(tmp_path, tiny_model):
    recipe = write_recipe(tmp_path, tiny_model("llama"), max_steps=2, eval_every=0)
    run = tmp_path / "runs" / "tiny"
    assert qalign("sft", str(recipe), cwd=tmp_path).returncode == 0
    before = snapshot(run)

    changed_lr = qalign("sft", str(recipe), "--set", "sft.lr=1e-3", cwd=tmp_path)
    assert changed_lr.returncode == 2, changed_lr.stdout
    assert "sft.lr: 0.005 -> 0.001" in changed_lr.stderr and "--no-resume --overwrite" in changed_lr.stderr

    # New rows in the same file: the user must not be told their new data was trained.
    write_jsonl(tmp_path / "data" / "train.jsonl", [{"prompt": "Say hi.", "completion": "Hi."}] * 32)
    changed_data = qalign("sft", str(recipe), cwd=tmp_path)
    assert changed_data.returncode == 2 and "the training data" in changed_data.stderr
    assert "Traceback" not in changed_data.stderr
    assert snapshot(run) == before


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_holds_it(tmp_path, tiny_model):
    recipe = write_recipe(tmp_path, tiny_model("llama"), max_steps=2, eval_every=0)
    run = tmp_path / "runs" / "tiny"
    run.mkdir(parents=True)
    (run / ".qalign-run").write_text("{}\n")
    # Another process holding the lock, as a running `qalign sft` does.
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run / ".qalign-lock")], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    try:
        refused = qalign("sft", str(recipe), cwd=tmp_path)
        assert refused.returncode == 2
        assert f"pid {holder.pid}" in refused.stderr and "Traceback" not in refused.stderr
        assert not (run / "sft").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The killed holder's lock is gone with it: the next run goes ahead.
    result = qalign("sft", str(recipe), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (run / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if not r.get("final")] == [1, 2]


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o666)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.pwrite(fd, f"{os.getpid()}\\n".encode(), 0)
print("locked", flush=True)
time.sleep(600)
"""


def test_a_run_that_fails_validation_leaves_no_folder(tmp_path, tiny_model):
    recipe = write_recipe(tmp_path, tiny_model("llama"), max_steps=2)
    write_jsonl(tmp_path / "data" / "train.jsonl", [{"prompt": "no completion here"}])
    result = qalign("sft", str(recipe), cwd=tmp_path)
    assert result.returncode == 2
    assert not (tmp_path / "runs").exists()


def test_lock_is_released_by_the_holder_exiting(tmp_path):
    from qalign.layout import LOCK_FILE, _lock

    with _lock(tmp_path):
        fd = os.open(tmp_path / LOCK_FILE, os.O_RDWR)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                raise AssertionError("the lock was not held")
            except BlockingIOError:
                pass
        finally:
            os.close(fd)
    assert not (tmp_path / LOCK_FILE).exists()  # let go: the folder is as it was
    with _lock(tmp_path):  # free again once the body is done
        assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())


def test_a_stale_dpo_stage_is_never_exported(tmp_path, tiny_model):
    recipe = add_dpo(write_recipe(tmp_path, tiny_model("llama"), max_steps=2, eval_every=0), max_steps=2)
    merge = {"merge": {"dtype": "fp32"}}
    import yaml

    data = yaml.safe_load(recipe.read_text()) | merge
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    run = tmp_path / "runs" / "tiny"

    # DPO before SFT: it says it starts from the base.
    early = qalign("dpo", str(recipe), cwd=tmp_path)
    assert early.returncode == 0, early.stderr
    assert "dpo starts from the base" in early.stderr
    assert qalign("sft", str(recipe), cwd=tmp_path).returncode == 0

    # The DPO adapter never saw SFT: exporting it is refused, and so is resuming it as if nothing changed.
    exported = qalign("merge", str(recipe), cwd=tmp_path)
    assert exported.returncode == 2 and "stale" in exported.stderr and "--stage sft" in exported.stderr
    assert not (run / "merged").exists()
    again = qalign("dpo", str(recipe), cwd=tmp_path)
    assert again.returncode == 2 and "starting adapter" in again.stderr

    # `qalign run` owns both stages: it trains DPO again from the SFT adapter, then merges.
    result = qalign("run", str(recipe), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "sft is already complete" in result.stdout
    assert "dpo is trained again" in result.stderr
    meta = json.loads((run / "dpo" / "adapter" / "qalign.json").read_text())
    from qalign.adapter import adapter_digest

    assert meta["run"]["identity"]["start"] == {"adapter": adapter_digest(run / "sft" / "adapter")}
    assert (run / "merged" / "config.json").exists()
    assert qalign("merge", str(recipe), cwd=tmp_path).returncode == 0


def test_adapter_folder_carries_a_model_card_and_the_end_of_turn_stop(tmp_path, tiny_model):
    recipe = write_recipe(tmp_path, tiny_model("llama"), max_steps=2, eval_every=0)
    assert qalign("sft", str(recipe), cwd=tmp_path).returncode == 0
    adapter = tmp_path / "runs" / "tiny" / "sft" / "adapter"
    card = (adapter / "README.md").read_text()
    assert "sft adapter" in card and str(tiny_model("llama")) in card and "final loss" in card
    from transformers import AutoTokenizer, GenerationConfig

    from qalign.chat_template import end_of_turn_id

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    stops = GenerationConfig.from_pretrained(adapter).eos_token_id
    stops = [stops] if isinstance(stops, int) else stops
    end = end_of_turn_id(tokenizer)
    assert end is not None and end in stops and tokenizer.eos_token_id in stops


def test_loss_logged_every_n_steps_is_the_mean_of_those_steps(tmp_path, tiny_model):
    recipe = write_recipe(tmp_path, tiny_model("llama"), max_steps=4, eval_every=0, save_every=0)
    every = tmp_path / "every"
    pairs = tmp_path / "pairs"
    for folder, log_every in ((every, 1), (pairs, 2)):
        result = qalign(
            "sft",
            str(recipe),
            "--set",
            f"output_dir={folder}",
            "--set",
            f"sft.log_every={log_every}",
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr
    read = lambda folder: [  # noqa: E731
        json.loads(line) for line in (folder / "sft" / "metrics.jsonl").read_text().splitlines()
    ]
    each = [r for r in read(every) if not r.get("final")]
    means = [r for r in read(pairs) if not r.get("final")]
    assert [r["step"] for r in means] == [2, 4]
    for record, (a, b) in zip(means, [(0, 1), (2, 3)], strict=True):
        assert abs(record["loss"] - (each[a]["loss"] + each[b]["loss"]) / 2) < 1e-6
