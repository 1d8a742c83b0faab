"""qalign under `accelerate launch`: its torchrun path (--multi_gpu) forms the world qalign reads; its own
launcher (--cpu, a MULTI_CPU config, an MPI hostfile) starts processes that share no world, which qalign refuses
instead of training one process alone (a smaller global batch than asked) or several unaware of each other."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import write_recipe
from test_cli_sft import ENV

from qalign.distributed import check_launcher
from qalign.errors import UserError

ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


@pytest.mark.parametrize(
    "env",
    [
        {},  # a plain `qalign sft`
        {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1"},  # torchrun, accelerate --multi_gpu
        {"ACCELERATE_USE_CPU": "True"},  # accelerate launch --cpu, one process asked for: no MASTER_ADDR
        {"MASTER_ADDR": "10.0.0.1"},  # an exported MASTER_ADDR without accelerate
        {"OMPI_COMM_WORLD_SIZE": "1"},
    ],
)
def test_launchers_that_describe_their_world_are_accepted(env):
    check_launcher("ddp", env)


@pytest.mark.parametrize(
    "env, named",
    [
        # What accelerate's own launcher sets for --cpu --num_processes 2 (read from accelerate 1.15's
        # prepare_simple_launcher_cmd_env, and seen in the process it starts).
        (
            {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
            "accelerate launch",
        ),
        ({"ACCELERATE_USE_CPU": "False", "MASTER_ADDR": "127.0.0.1"}, "accelerate launch"),
        ({"OMPI_COMM_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, "OMPI_COMM_WORLD_SIZE=2"),
        ({"PMI_SIZE": "4"}, "PMI_SIZE=4"),
    ],
)
def test_launchers_that_start_processes_without_a_world_are_refused(env, named):
    with pytest.raises(UserError, match=named) as refused:
        check_launcher("ddp", env)
    assert "--multi_gpu --num_processes N -m qalign" in str(refused.value)


def test_accelerate_fsdp_needs_the_recipes_fsdp_strategy():
    # accelerate launch --use_fsdp runs torchrun with ACCELERATE_USE_FSDP=true; qalign's sharding is the recipe's.
    env = {"WORLD_SIZE": "2", "RANK": "0", "ACCELERATE_USE_FSDP": "true"}
    with pytest.raises(UserError, match=r"distributed\.strategy is ddp"):
        check_launcher("ddp", env)
    check_launcher("fsdp", env)
    check_launcher("ddp", {**env, "ACCELERATE_USE_FSDP": "false"})


def test_accelerate_launch_cpu_with_two_processes_is_refused_before_training(tmp_path, tiny_model):
    # The trap: `--cpu --num_processes 2` starts one process. It is refused before anything is written.
    recipe = write_recipe(tmp_path, tiny_model("llama"), max_steps=1)
    done = subprocess.run(
        [*ACCELERATE, "--cpu", "--num_processes", "2", "-m", "qalign", "sft", str(recipe)],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "error: accelerate launch started qalign as one process" in done.stderr, done.stderr
    assert not (tmp_path / "runs").exists()
