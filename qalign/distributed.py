"""More than one process: the world a worker belongs to, the few collectives the loop needs, and the launcher.

Workers are started by torch's own launcher (`torch.distributed.run`, the engine behind `torchrun`), by
`qalign ... --nproc N` or by the user; the process group is torch.distributed's (NCCL on CUDA, gloo on a CPU),
and gradients are averaged by DistributedDataParallel. Rank 0 alone writes files and prints.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

from qalign.errors import UserError

T = TypeVar("T")

# Where each worker leaves its one-line failure for `--nproc`'s launcher to report (set by the launcher).
ERRORS_ENV = "QALIGN_ERRORS_DIR"


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def many(self) -> bool:
        return self.size > 1


SINGLE = World()


def world_from_env() -> World:
    """The world torchrun's environment describes (one process when there is none)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


# How MPI launchers (mpirun; accelerate launch's MULTI_CPU with a hostfile goes through it) number their processes.
MPI_SIZES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
HOW_TO_START = (
    "start the workers with `accelerate launch --multi_gpu --num_processes N -m qalign ...` (torchrun underneath; "
    "gloo on a CPU), `torchrun --nproc-per-node N -m qalign ...` or `qalign ... --nproc N`"
)


def check_launcher(strategy: str = "ddp", env: Mapping[str, str] = os.environ) -> None:
    """Refuse a launcher that asked for several processes without describing a torch world (WORLD_SIZE): each
    of its processes would otherwise train alone, or a single one would train a smaller global batch than asked.
    accelerate launch's own launcher (--cpu, a MULTI_CPU config, or no --multi_gpu on a machine without two
    GPUs) starts one process and sets MASTER_ADDR only when asked for more than one. Also refuse accelerate's
    --use_fsdp on a ddp recipe: qalign reads the recipe's distributed.strategy, not accelerate's FSDP settings."""
    if "WORLD_SIZE" in env:
        if env.get("ACCELERATE_USE_FSDP", "").lower() == "true" and strategy != "fsdp":
            raise UserError(
                f"accelerate launch --use_fsdp, but the recipe's distributed.strategy is {strategy}: qalign does "
                "not read accelerate's FSDP settings; set distributed.strategy: fsdp (or --set "
                "distributed.strategy=fsdp) to shard, or launch with --multi_gpu"
            )
        return
    for key in MPI_SIZES:
        if env.get(key, "").isdigit() and int(env[key]) > 1:
            raise UserError(
                f"{key}={env[key]}: qalign was started by an MPI launcher, whose processes it does not join into "
                f"one run; {HOW_TO_START}"
            )
    if "ACCELERATE_USE_CPU" in env and "MASTER_ADDR" in env:
        raise UserError(
            "accelerate launch started qalign as one process although more were asked for (MASTER_ADDR is set, "
            "WORLD_SIZE is not: its --cpu and MULTI_CPU launchers start one process, as does no --multi_gpu "
            f"without two GPUs); {HOW_TO_START}; for one process, drop --num_processes"
        )


def join(world: World) -> torch.device:
    """Join the process group (once) and return this worker's device: its own GPU, never a shared `auto` map."""
    if torch.cuda.is_available():
        device = torch.device("cuda", world.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world.many and not dist.is_initialized():
        _exit_with_launcher()
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def _exit_with_launcher() -> None:
    """A worker whose launcher is gone (killed with SIGKILL, say) would wait in its next collective forever,
    holding its GPU: it leaves instead. Its run folder keeps the last complete checkpoint."""
    launcher = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != launcher:
                os._exit(1)

    threading.Thread(target=watch, name="qalign-launcher-watch", daemon=True).start()


def leave(world: World) -> None:
    if world.many and dist.is_initialized():
        dist.destroy_process_group()


def sum_values(values: dict[str, float], world: World) -> dict[str, float]:
    """Each key summed over every rank (every rank must pass the same keys)."""
    if not world.many or not values:
        return values
    keys = sorted(values)
    tensor = _on_backend(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
    dist.all_reduce(tensor)
    return dict(zip(keys, tensor.cpu().tolist(), strict=True))


def any_rank(flag: bool, world: World) -> bool:
    """True on every rank when it is true on any: how ranks agree to stop at the same step."""
    if not world.many:
        return flag
    tensor = _on_backend(torch.tensor([1.0 if flag else 0.0]))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def from_main(value: object, world: World) -> object:
    """Rank 0's `value` on every rank (anything picklable)."""
    if not world.many:
        return value
    box = [value if world.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_rows(part: torch.Tensor, world: World) -> torch.Tensor:
    """Every rank's rows, in rank order (ranks may hold different row counts)."""
    if not world.many:
        return part
    pieces: list = [None] * world.size
    dist.all_gather_object(pieces, part.cpu())
    return torch.cat(pieces)


def barrier(world: World) -> None:
    if world.many:
        dist.barrier()


def _on_backend(tensor: torch.Tensor) -> torch.Tensor:
    # NCCL reduces only CUDA tensors; gloo takes CPU ones.
    if dist.get_backend() == "nccl":
        return tensor.cuda()
    return tensor


# -- failures: each worker's one line, for the launcher -------------------------------------------------------
def record_failure(world: World, message: str, code: int) -> None:
    """Leave this rank's failure where `--nproc`'s launcher reads it (no-op under a user's own torchrun)."""
    folder = os.environ.get(ERRORS_ENV)
    if not folder:
        return
    path = Path(folder) / f"rank-{world.rank}.json"
    path.write_text(json.dumps({"rank": world.rank, "message": message, "code": code, "time": time.time()}))


def first_failure(folder: Path) -> dict | None:
    records = []
    for path in folder.glob("rank-*.json"):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return min(records, key=lambda r: (r["time"], r["rank"])) if records else None


def launch(nproc: int, argv: list[str]) -> tuple[int, str | None]:
    """Run `qalign <argv>` in `nproc` workers through torch.distributed.run on this machine: (the exit code, the
    first failing rank's one-line message). The workers print nothing but rank 0's output."""
    import logging

    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The launcher's own log lines (rendezvous, worker exits) are not for the user.
    logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"qalign-{os.getpid()}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
        # Ctrl-C reaches the launcher, which passes it on to every worker: they finish the step and save one
        # checkpoint together; only a worker still busy after this long is killed.
        shutdown_timeout=600,
    )
    with tempfile.TemporaryDirectory(prefix="qalign-ranks-") as folder:
        os.environ[ERRORS_ENV] = folder
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        try:
            elastic_launch(config, sys.executable)("-m", "qalign", *argv)
        except SignalException as exc:
            failure = first_failure(Path(folder))
            if failure is not None:
                return int(failure["code"]), failure["message"]
            return 128 + int(exc.sigval), f"{exc.sigval.name}: the workers were stopped"
        except ChildFailedError as exc:
            failure = first_failure(Path(folder))
            if failure is not None:
                return int(failure["code"]), failure["message"]
            # A crash rather than a qalign error: the rank's traceback is above, on its stderr.
            rank, first = min(exc.failures.items(), key=lambda item: item[1].timestamp)
            return (
                first.exitcode if first.exitcode > 0 else 1
            ), f"worker {rank} failed (exit code {first.exitcode})"
        finally:
            os.environ.pop(ERRORS_ENV, None)
    return 0, None


def main_decides(decide: Callable[[], T], world: World) -> T:
    """What rank 0's `decide()` returns, on every rank; a UserError it raises is raised on every rank (so that
    a refusal stops the whole run, not rank 0 alone). For decisions that read or change the disk."""
    if not world.many:
        return decide()
    outcome: tuple[str, object] | None = None
    if world.main:
        try:
            outcome = ("value", decide())
        except UserError as exc:
            from_main(("error", str(exc)), world)
            raise
    kind, value = from_main(outcome, world)
    if kind == "error":
        raise UserError(str(value))
    return value  # type: ignore[return-value]


def replicate(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model's decoder under DistributedDataParallel, which averages the trainable parameters' gradients
    over the ranks in the backward of each step's last micro-batch (see Trainer._sync). Every rank built the
    same adapter from the same seed; DDP also broadcasts rank 0's at the start."""
    from torch.nn.parallel import DistributedDataParallel

    from qalign.logprobs import DecoderCall

    # find_unused_parameters stays off: every LoRA weight gets a gradient each step, and with non-reentrant
    # checkpointing off is what works (reentrant checkpointing with it on crashes).
    # broadcast_buffers off: the decoder's buffers (rotary tables) are the same on every rank by construction,
    # and the broadcast would be one more collective per forward.
    return DistributedDataParallel(
        DecoderCall(model),
        device_ids=[device.index] if device.type == "cuda" else None,
        broadcast_buffers=False,
    )


# -- fsdp: the 4-bit base sharded over the ranks ---------------------------------------------------------------
def shard_mesh(world: World, device: torch.device) -> object:
    """The ranks' device mesh for fsdp (a collective: every rank calls it, before any loads its model)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world.size,))


TURN_TIMEOUT = datetime.timedelta(hours=12)
"""How long a rank waits for the ones before it: loading a 70B model in host memory takes tens of minutes, and
the process group's own timeout (10 minutes for NCCL) would end the wait first."""


def in_turns(work: Callable[[], T], world: World) -> T:
    """`work` on every rank, one rank after another (rank 0 first), each waiting for the ones before it."""
    if not world.many:
        return work()
    waits = dist.new_group(backend="gloo", timeout=TURN_TIMEOUT)
    result = None
    for rank in range(world.size):
        if rank == world.rank:
            result = work()
        dist.barrier(group=waits)
    dist.destroy_process_group(waits)
    return result


def shard(model: torch.nn.Module, mesh: object, device: torch.device) -> tuple[int, int]:
    """FSDP2 (`fully_shard`), in place: every decoder layer is a unit whose weights (the 4-bit base's included)
    are split over the ranks and gathered only while it runs; the decoder is the root unit. Each unit's weights
    move to `device` (from host memory when the model was loaded there) as it is sharded, and what no unit holds
    follows them: the LM head stays whole on every rank (the loss multiplies by its weight directly, outside
    any unit's forward), and so does a tied input embedding. Returns (bytes of weights this rank holds, bytes
    of the whole model)."""
    import bitsandbytes as bnb
    from torch.distributed.fsdp import fully_shard

    from qalign.logprobs import base_model

    for name, module in model.named_modules():
        layer = module if isinstance(module, bnb.nn.Linear4bit) else getattr(module, "base_layer", None)
        if isinstance(layer, bnb.nn.Linear4bit):
            module.register_forward_pre_hook(_quant_state_hook(layer, name, _checksum(layer.weight)))
    base = base_model(model)
    decoder = base.get_decoder()
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise UserError(
            f"distributed.strategy: fsdp: {type(decoder).__name__} has no `layers` to shard; use ddp"
        )
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    head = base.get_output_embeddings()
    tied = {p for p in decoder.parameters() if head is not None and p is head.weight}
    fully_shard(decoder, mesh=mesh, ignored_params=tied or None)
    _move_the_rest(model, device)
    return _bytes(model, local=True), _bytes(model, local=False)


def _move_the_rest(model: torch.nn.Module, device: torch.device) -> None:
    """Move every weight and buffer no fsdp unit manages (the LM head, a tied embedding) to `device`."""
    from torch.distributed.tensor import DTensor

    for module in model.modules():
        for param in module._parameters.values():
            if param is not None and not isinstance(param, DTensor) and param.device != device:
                param.data = param.data.to(device)
        for key, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device:
                module._buffers[key] = buffer.to(device)


def _bytes(model: torch.nn.Module, local: bool) -> int:
    """Bytes of the model's weights this rank holds (local) or all ranks together."""
    total = 0
    for p in model.parameters():
        tensor = p.to_local() if local and hasattr(p, "to_local") else p
        total += tensor.numel() * tensor.element_size()
    return total


def _checksum(weight: torch.Tensor) -> list[int]:
    """Sums of the bytes of 16 consecutive slices of a packed 4-bit weight: a gather that changes, drops or
    reorders bytes changes them."""
    flat = weight.detach().reshape(-1).view(torch.uint8)
    return [int(part.sum(dtype=torch.int64)) for part in torch.tensor_split(flat, 16)]


def _quant_state_hook(layer: torch.nn.Module, name: str, checksum: list[int]) -> Callable:
    """Gathering a unit's weights gives each 4-bit weight a new tensor without the quantization state, which
    bitsandbytes keeps on the layer too: put it back before the layer (or the LoRA layer around it) runs.

    The packed 4-bit bytes travel in a float dtype, and an operation that touches them as floats (a cast, a NaN
    made canonical) corrupts them silently (bitsandbytes#1945 reports this for FSDP2 with bf16 storage on some
    GPUs): the first gather is checked against the bytes as loaded, and a difference stops the run."""
    pending = [True]

    def hook(module: torch.nn.Module, args: object) -> None:
        weight = layer.weight
        if getattr(weight, "quant_state", None) is None:
            weight.quant_state = layer.quant_state
        if pending[0]:
            pending[0] = False
            if _checksum(weight) != checksum:
                raise UserError(
                    f"distributed.strategy: fsdp: the 4-bit weights of {name} came back changed from the "
                    "ranks' gather (their packed bytes do not survive this torch/bitsandbytes combination); "
                    "use distributed.strategy: ddp"
                )

    return hook


def gradient_sync(model: torch.nn.Module, on: bool) -> contextlib.AbstractContextManager:
    """Whether this backward reduces gradients over the ranks (the last micro-batch of a step does)."""
    if isinstance(getattr(model, "module", None), torch.nn.Module) and hasattr(model, "no_sync"):
        return contextlib.nullcontext() if on else model.no_sync()
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_requires_gradient_sync(on, recurse=False)
    return contextlib.nullcontext()


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def full_states(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict]:
    """(the trainable weights, the optimizer's state) whole, from a sharded model: a collective (every rank
    calls it); rank 0 gets the tensors. The optimizer's state is keyed by parameter index, as
    `optimizer.state_dict()` keys it on one process, so a checkpoint resumes under either strategy."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    weights = full_weights(model)
    named = get_optimizer_state_dict(model, optimizer, options=options)
    index = {name: i for i, name in enumerate(_trainable_names(model))}
    groups = [{**g, "params": [index[name] for name in g["params"]]} for g in named.get("param_groups", [])]
    return weights, {
        "state": {index[k]: v for k, v in named.get("state", {}).items()},
        "param_groups": groups,
    }


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights of a sharded model, whole (a collective; rank 0 gets them, on the CPU)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load an optimizer state keyed by parameter index (any checkpoint) into a sharded model's optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _trainable_names(model)
    named = {
        "state": {names[int(i)]: v for i, v in saved["state"].items()},
        "param_groups": [
            {**g, "params": [names[int(i)] for i in g["params"]]} for g in saved["param_groups"]
        ],
    }
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))


def _trainable_names(model: torch.nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]
