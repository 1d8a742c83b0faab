"""More than one process, on a CPU over gloo: `--nproc 2` trains what one process with twice the accumulation
trains, an interrupted run resumes (under another process count) to the uninterrupted result, and a worker's
error is one line. Real processes (the launcher starts workers), so kept few: CI has 2 cores."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import add_dpo, arithmetic_rows, preference_rows, write_jsonl, write_recipe
from safetensors.torch import load_file
from test_cli_sft import ENV, QALIGN, qalign, qalign_process, wait_for

# fp32: the comparisons are to summation order, which bf16 would blur.
FP32 = ("--set", "model.compute_dtype=fp32")


def adapter(run: Path, stage: str) -> dict:
    return load_file(str(run / stage / "adapter" / "adapter_model.safetensors"))


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def losses(run: Path, stage: str) -> list[float]:
    lines = (run / stage / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_model) -> Path:
    folder = tmp_path_factory.mktemp("distributed")
    # 32 rows in batches of 3 are 11 micro-batches an epoch: its sixth step has one, which rank 1 repeats with
    # zero weight (every backward is a collective).
    path = write_recipe(
        folder, tiny_model(), max_steps=6, batch_size=3, grad_accum=1, save_every=3, eval_every=3
    )
    add_dpo(path, max_steps=2, grad_accum=1)
    data = yaml.safe_load(path.read_text())
    data["lora"]["dropout"] = 0.0  # dropout masks follow the micro-batch layout, which differs by rank
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def process(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """qalign in a real process with one thread per process: a matrix multiply sums in another order on two
    threads than on one, so only then can one process and two agree to the bit."""
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*QALIGN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def two_processes(recipe) -> Path:
    for stage in ("sft", "dpo"):
        done = process(
            stage, str(recipe), "--nproc", "2", *FP32, "--set", "output_dir=runs/two", cwd=recipe.parent
        )
        assert done.returncode == 0, done.stderr
    return recipe.parent / "runs" / "two"


def test_two_processes_train_what_one_process_with_twice_the_accumulation_trains(recipe, two_processes):
    one = recipe.parent / "runs" / "one"
    for stage in ("sft", "dpo"):
        args = ("--set", "output_dir=runs/one", "--set", f"{stage}.grad_accum=2")
        done = process(stage, str(recipe), "--nproc", "1", *FP32, *args, cwd=recipe.parent)
        assert done.returncode == 0, done.stderr
        # The same sums in the same order: identical, not merely close.
        assert largest_difference(adapter(two_processes, stage), adapter(one, stage)) == 0.0
        # Logged metrics are the whole step's, summed over the ranks, not rank 0's half.
        assert losses(two_processes, stage) == pytest.approx(losses(one, stage), rel=1e-12, abs=0)
        assert len(losses(two_processes, stage)) == len(losses(one, stage)) > 0
    # Rank 0 alone wrote the DPO reference, once per dataset (train and eval).
    assert len(list((two_processes / "dpo" / "reference").iterdir())) == 2


def test_fsdp_agrees_with_ddp(recipe, two_processes):
    """fsdp shards each decoder layer's weights (the 4-bit base's too) over the ranks and gathers them while the
    layer runs: the same sums, so the same adapters; the run says what each process holds."""
    for stage in ("sft", "dpo"):
        args = ("--set", "output_dir=runs/fsdp", "--set", "distributed.strategy=fsdp")
        done = process(stage, str(recipe), "--nproc", "2", *FP32, *args, cwd=recipe.parent)
        assert done.returncode == 0, done.stderr
        assert "fsdp: each of 2 processes holds" in done.stdout
        fsdp = recipe.parent / "runs" / "fsdp"
        assert largest_difference(adapter(fsdp, stage), adapter(two_processes, stage)) < 1e-6
        assert losses(fsdp, stage) == pytest.approx(losses(two_processes, stage), rel=1e-6)


def test_an_interrupted_fsdp_run_resumes_on_one_process(recipe, two_processes):
    """Ctrl-C stops both ranks after the same step with one checkpoint, gathered whole; one process with the
    same global batch (grad_accum 2) resumes it to what the uninterrupted run trained."""
    run = ["sft", str(recipe), *FP32, "--set", "output_dir=runs/cut", "--set", "sft.save_every=100"]
    proc = subprocess.Popen(
        [*QALIGN, *run, "--nproc", "2", "--set", "distributed.strategy=fsdp"],
        cwd=recipe.parent,
        env={**ENV, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = recipe.parent / "runs" / "cut" / "sft" / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.count("saved a checkpoint at step") == 1 and "Traceback" not in err
    assert len(list((recipe.parent / "runs" / "cut" / "sft" / "checkpoints").glob("step-*"))) == 1
    done = process(*run, "--nproc", "1", "--set", "sft.grad_accum=2", cwd=recipe.parent)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stdout
    cut = adapter(recipe.parent / "runs" / "cut", "sft")
    assert largest_difference(cut, adapter(two_processes, "sft")) < 1e-6


def test_a_workers_error_is_one_line_and_exit_2(recipe):
    folder = recipe.parent
    write_jsonl(folder / "data" / "broken.jsonl", [*arithmetic_rows(1), {"messages": 5}])
    done = qalign_process(
        "sft",
        str(recipe),
        "--nproc",
        "2",
        "--set",
        "sft.data.train=data/broken.jsonl",
        "--set",
        "output_dir=runs/bad",
        cwd=folder,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines == [f"error: {folder / 'data' / 'broken.jsonl'}:2: 'messages' must be a list, got int"], (
        done.stderr
    )
    assert not (folder / "runs" / "bad").exists()
    # A bad recipe is refused before any worker starts.
    done = qalign("sft", str(recipe), "--nproc", "2", "--set", "sft.lrr=1", cwd=folder)
    assert done.returncode == 2 and "did you mean 'sft.lr'" in done.stderr


def test_workers_leave_when_their_launcher_is_killed(recipe):
    """SIGKILL on `--nproc`'s launcher: its workers (in sessions of their own) would wait in their next
    collective forever, holding the run's lock; they leave instead, and the same command then resumes."""
    import os
    import time

    run = ["sft", str(recipe), "--set", "output_dir=runs/orphans", "--set", "sft.max_steps=400"]
    proc = subprocess.Popen(
        [*QALIGN, *run, "--nproc", "2"],
        cwd=recipe.parent,
        env={**ENV, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = recipe.parent / "runs" / "orphans" / "sft" / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, proc)

    def workers() -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, ValueError):
                continue
            if entry.name.isdigit() and "runs/orphans" in command and int(entry.name) != proc.pid:
                found.append(int(entry.name))
        return found

    assert len(workers()) == 2
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 30
    while workers() and time.monotonic() < deadline:
        time.sleep(0.2)
    left = workers()
    for pid in left:
        os.kill(pid, 9)
    assert not left, "workers outlived their launcher"
    done = process(*run, "--nproc", "2", "--set", "sft.max_steps=4", "--force-resume", cwd=recipe.parent)
    assert done.returncode == 0, done.stderr


def test_an_fsdp_rank_short_of_reference_batches_still_runs_each_forward(recipe):
    """Under fsdp every forward gathers weights from every rank: a rank whose share of the reference pass has
    fewer batches (here none: one held-out pair for two ranks) runs the missing forwards on a filler, and the
    values are a single process's."""
    folder = recipe.parent
    write_jsonl(folder / "data" / "dpo_one.jsonl", preference_rows(1, start=300))
    # No sft adapter in these output folders: both runs start from the base, so their references agree.
    args = (*FP32, "--set", "dpo.data.eval=data/dpo_one.jsonl", "--set", "dpo.max_steps=1")
    runs = {}
    for nproc, strategy in (("2", "fsdp"), ("1", "ddp")):
        out = f"runs/reference-{strategy}"
        done = process(
            "dpo",
            str(recipe),
            *args,
            "--nproc",
            nproc,
            "--set",
            f"distributed.strategy={strategy}",
            "--set",
            f"output_dir={out}",
            cwd=folder,
        )
        assert done.returncode == 0, done.stderr
        runs[strategy] = {
            p.name.split("-")[0]: load_file(str(p))["reference"]
            for p in (folder / out / "dpo" / "reference").iterdir()
        }
    assert runs["fsdp"].keys() == runs["ddp"].keys() == {"train", "eval"}
    for name, values in runs["fsdp"].items():
        assert values.shape == runs["ddp"][name].shape
        assert float((values - runs["ddp"][name]).abs().max()) < 1e-5


def test_fsdp_stops_when_a_gather_changes_the_packed_4bit_bytes(tiny_model, tmp_path):
    """The packed NF4 bytes travel as floats through FSDP's gather; bytes that come back changed (as
    bitsandbytes#1945 reports for bf16 storage on some GPUs) stop the run with one line instead of training on
    garbage. One process over gloo, in this one."""
    import bitsandbytes as bnb
    import torch
    import torch.distributed as dist

    from qalign.distributed import World, shard, shard_mesh
    from qalign.errors import UserError
    from qalign.logprobs import base_model
    from qalign.model import attach_lora, load_base
    from qalign.recipe import LoraSpec, ModelSpec

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        outcomes = []
        for corrupt in (False, True):
            spec = ModelSpec(base=str(tiny_model()), compute_dtype="fp32")
            base = load_base(spec, torch.device("cpu"), sharded=True)
            model = attach_lora(base, LoraSpec(r=4, dropout=0.0), gradient_checkpointing=False)
            shard(model, shard_mesh(World(), torch.device("cpu")), torch.device("cpu"))
            if corrupt:
                layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
                with torch.no_grad():
                    packed = layer.weight.to_local().view(torch.uint8).reshape(-1)
                    packed[3] ^= 0x40
            decoder = base_model(model).get_decoder()
            try:
                decoder(input_ids=torch.tensor([[1, 5, 9, 2]]))
                outcomes.append("ran")
            except UserError as exc:
                outcomes.append(str(exc))
        assert outcomes[0] == "ran"
        assert "came back changed" in outcomes[1] and "use distributed.strategy: ddp" in outcomes[1]
    finally:
        dist.destroy_process_group()


def test_the_plan_warns_when_fsdp_cannot_load_a_copy_in_host_memory(recipe, monkeypatch):
    """On GPUs fsdp quantizes each process's whole copy in host RAM (one process at a time): a model bigger
    than the RAM is said before loading starts. ddp, and enough RAM, say nothing of it."""
    import io

    import torch
    from rich.console import Console

    from qalign import memory_auto, runner
    from qalign.model import load_tokenizer
    from qalign.progress import Progress
    from qalign.recipe_load import load_recipe
    from qalign.stage_data import load_stage_data

    monkeypatch.setattr(memory_auto, "free_memory", lambda kind: 24 * 2**30)
    warnings = {}
    for strategy, ram in (("fsdp", 2**10), ("ddp", 2**10), ("fsdp", 2**40)):
        monkeypatch.setattr(memory_auto, "available_ram", lambda ram=ram: ram)
        loaded = load_recipe(recipe, [f"distributed.strategy={strategy}"])
        progress = Progress(Console(file=io.StringIO()), Console(file=io.StringIO()))
        data = load_stage_data(loaded, "sft", load_tokenizer(loaded.model, progress.warn), progress)
        runner.plan_memory(loaded, "sft", data, torch.device("cuda"), {}, progress, processes=2)
        warnings[(strategy, ram)] = " ".join(progress.warnings)
    assert "fsdp quantizes each process's copy of the model in host memory" in warnings[("fsdp", 2**10)]
    assert "host memory" not in warnings[("ddp", 2**10)] + warnings[("fsdp", 2**40)]


def _turns_worker(rank: int, store: str, out: str) -> None:
    import datetime
    import time

    import torch.distributed as dist

    from qalign.distributed import World, in_turns

    # The group's own timeout is far shorter than rank 0's turn: only in_turns' own wait outlasts it.
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=3)
    )

    def work() -> float:
        if rank == 0:
            time.sleep(6)
        return time.monotonic()

    done = in_turns(work, World(rank=rank, size=2))
    Path(f"{out}-{rank}").write_text(repr(done))
    dist.destroy_process_group()


def test_ranks_take_turns_longer_than_the_process_groups_timeout(tmp_path):
    """fsdp's loading turns: rank 1 starts after rank 0's turn, however long (a 70B model quantizes in host
    memory for tens of minutes; NCCL's timeout is 10)."""
    import torch.multiprocessing as mp

    mp.start_processes(
        _turns_worker, args=(str(tmp_path / "store"), str(tmp_path / "end")), nprocs=2, start_method="spawn"
    )
    ends = [float((tmp_path / f"end-{rank}").read_text()) for rank in (0, 1)]
    assert ends[1] > ends[0]
