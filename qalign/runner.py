"""One stage end to end, the same for SFT and DPO: check the data, claim the run folder, decide between
resuming, starting over and refusing, plan memory, load the model, train, and save the finished adapter.

What SFT and DPO each add (their examples, collate, step loss, metrics; DPO's reference) is in sft.py and dpo.py.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import set_seed

from qalign import __version__
from qalign.adapter import model_card, read_metadata, save_adapter
from qalign.allocator import keep_freed_memory
from qalign.checkpoint import CheckpointManager
from qalign.distributed import (
    SINGLE,
    World,
    barrier,
    from_main,
    full_weights,
    in_turns,
    join,
    leave,
    main_decides,
    replicate,
    shard,
    shard_mesh,
)
from qalign.errors import UserError
from qalign.identity import DTYPE_NAMES, START_CHANGE, fingerprint_changes, stage_identity
from qalign.layout import RunLayout, StagePaths, check_output_dir, claim_output_dir, starting_adapter
from qalign.lora import tune_lora_layers
from qalign.model import (
    attach_lora,
    compute_dtype,
    count_parameters,
    footprint_bytes,
    load_base,
    load_tokenizer,
    pick_device,
)
from qalign.progress import Progress, format_duration
from qalign.recipe import Recipe, TrainSpec
from qalign.rmsnorm import fuse_rms_norms
from qalign.stage_data import StageData, load_stage_data
from qalign.trackers import Trackers, check_available
from qalign.train import Stage, Trainer


@dataclass(frozen=True)
class RunOptions:
    resume: bool = True
    overwrite: bool = False
    force_resume: bool = False
    redo_on_new_start: bool = False
    """`qalign run` owns both stages: a DPO stage whose SFT start has changed is trained again, not refused."""


@dataclass
class StageContext:
    """Everything a stage's make_stage may use to build its Stage."""

    recipe: Recipe
    spec: TrainSpec
    paths: StagePaths
    tokenizer: object
    data: StageData
    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    start: Path | None
    progress: Progress
    world: World = SINGLE


def run_stages(
    recipe: Recipe, names: list[str], progress: Progress, options: RunOptions, world: World = SINGLE
) -> None:
    """`qalign run` (and `sft`/`dpo`): the recipe's stages among `names`, in order. Training stages run on every
    rank; merging and exporting are one process's work, rank 0's once training is done."""
    for name in names:
        if len(names) > 1:
            progress.console.rule(f"[bold]{name}")
        if name in ("merge", "export") and world.many:
            leave(world)
            if not world.main:
                return
            world = SINGLE
        if name == "merge":
            from qalign.merge import run_merge

            run_merge(recipe, progress, overwrite=options.overwrite, replace_own=True)
        elif name == "export":
            from qalign.gguf_export import export_recipe

            export_recipe(recipe, progress)
        else:
            run_stage(recipe, name, progress, options, world)
    leave(world)


def run_stage(
    recipe: Recipe,
    name: str,
    progress: Progress,
    options: RunOptions = RunOptions(),
    world: World = SINGLE,
) -> Path:
    """`qalign sft` / `qalign dpo`: returns the finished adapter folder. With more than one process every rank
    runs this; rank 0 alone decides what touches the disk (claiming the folder, resume or start over, the
    memory plan) and writes."""
    if getattr(recipe, name) is None:
        raise UserError(f"{recipe.source}: the recipe has no '{name}' section")
    check_available(recipe.report_to)
    check_output_dir(recipe)
    tokenizer = load_tokenizer(recipe.model, progress.warn)
    # Every row is checked before anything is written: a bad row leaves the disk as it was.
    data = load_stage_data(recipe, name, tokenizer, progress)
    start = starting_adapter(recipe) if name == "dpo" else None
    if name == "dpo" and start is None and recipe.sft is not None:
        progress.warn(
            "dpo starts from the base: the recipe has an sft section but there is no sft adapter yet "
            "(qalign sft first, or qalign run for both)"
        )
    device = join(world) if world.many else pick_device()
    dtype = compute_dtype(recipe.model.compute_dtype, device)
    with _claimed(recipe, world) as layout:
        paths = layout.stage(name)
        checkpoints = CheckpointManager(paths.checkpoints, warn=progress.warn)

        def decide() -> tuple[Recipe, int | None, dict, Path | str | None]:
            checkpoints.recover()
            recorded = _recorded(paths, checkpoints, options)
            earlier = recorded.get("identity", {}).get(name, {}) if recorded else {}
            planned, plan_total = plan_memory(recipe, name, data, device, earlier, progress, world.size)
            identity = stage_identity(planned, name, dtype, start, world.size)
            fingerprint = {"identity": identity, "data_hash": data.digest}
            return (
                planned,
                plan_total,
                fingerprint,
                _decide(paths, checkpoints, fingerprint, options, name, progress),
            )

        recipe, plan_total, fingerprint, resume_from = main_decides(decide, world)
        if resume_from == "done":
            return paths.adapter
        sharded = world.many and recipe.distributed.strategy == "fsdp"
        mesh = shard_mesh(world, device) if sharded else None

        def build() -> tuple[torch.nn.Module, Stage]:
            model = load_model(recipe, name, device, dtype, start, progress, sharded)
            spec = getattr(recipe, name)
            context = StageContext(
                recipe, spec, paths, tokenizer, data, model, device, dtype, start, progress, world
            )
            if name == "sft":
                from qalign.sft import make_stage
            else:
                from qalign.dpo import make_stage
            stage = make_stage(context)
            if mesh is not None:
                held, whole = shard(model, mesh, device)
                progress.info(
                    f"fsdp: each of {world.size} processes holds {held / 2**20:,.1f} MiB of the model's "
                    f"{whole / 2**20:,.1f} MiB of weights"
                )
            return model, stage

        # Under fsdp the processes load one after another, each keeping only its shard before the next loads:
        # one whole copy of the model in host memory at a time.
        model, stage = in_turns(build, world) if sharded else build()
        if device.type == "cpu":
            # After loading, whose buffers are gone for good; before the reference pass and the steps, which
            # allocate the same tensors again and again.
            keep_freed_memory()
        if stage.prepare is not None:
            stage.prepare()
        config = recipe.model_dump(mode="json")
        trackers = Trackers(
            recipe.report_to if world.main else [], paths, f"{recipe.name}-{name}", config, progress.warn
        )
        runs = replicate(model, device) if world.many and not sharded else model
        trainer = Trainer(
            stage, runs, paths, recipe.seed, device, dtype, progress, fingerprint, trackers, world
        )
        final = trainer.fit(resume_from, recipe.to_yaml())
        # A sharded adapter is gathered by every rank together; rank 0 writes it.
        weights = full_weights(model) if sharded else None
        if not world.main:
            barrier(world)  # rank 0 saves the adapter
            return paths.adapter
        spec = getattr(recipe, name)
        metadata = {
            "qalign": __version__,
            "name": recipe.name,
            "stage": name,
            "base": recipe.model.base,
            "revision": recipe.model.revision,
            "quantization": recipe.model.quantization,
            "double_quant": recipe.model.double_quant,
            "compute_dtype": DTYPE_NAMES[dtype],
            "trust_remote_code": recipe.model.trust_remote_code,
            "data": spec.data.train,
            "started_from": str(start) if start else None,
            "steps": trainer.total,
            "run": fingerprint,
        }
        save_adapter(model, tokenizer, paths.adapter, metadata, model_card(metadata, final), weights)
        peak, kind = measured_peak()
        trainer.metrics.append(
            {
                "step": trainer.step,
                "final": True,
                "adapter": str(paths.adapter),
                "plan_total_bytes": plan_total,
                "peak_memory_bytes": peak,
                "peak_memory_kind": kind,
                # What the steps' records cannot add up to (log_every averages them): the stage's totals.
                "tokens": trainer.tokens_seen,
                "train_seconds": round(trainer.seconds, 3),
            }
        )
        what = (
            "CUDA memory allocated by tensors"
            if kind == "cuda_max_allocated"
            else "peak RSS of the whole process (Python and libraries included; the plan counts tensors)"
        )
        versus = f" (plan: {plan_total / 2**30:.2f} GiB)" if plan_total else ""
        rate = trainer.tokens_seen / max(trainer.seconds, 1e-9)
        progress.info(
            f"{name} done: {trainer.total} steps in {format_duration(trainer.seconds)}, {rate:,.0f} tok/s; "
            f"measured peak: {peak / 2**30:.2f} GiB, {what}{versus}"
        )
        progress.info(f"adapter saved to {paths.adapter}")
        barrier(world)
        return paths.adapter


@contextlib.contextmanager
def _claimed(recipe: Recipe, world: World) -> Iterator[RunLayout]:
    """The run folder, claimed (and locked) by rank 0 for the body; the other ranks follow its outcome."""
    with contextlib.ExitStack() as stack:
        problem = None
        if world.main:
            try:
                layout = stack.enter_context(claim_output_dir(recipe))
            except UserError as exc:
                if not world.many:
                    raise
                problem = str(exc)
        problem = from_main(problem, world)
        if problem is not None:
            raise UserError(problem)
        yield layout if world.main else RunLayout(recipe.out)


def _recorded(paths: StagePaths, checkpoints: CheckpointManager, options: RunOptions) -> dict | None:
    """What the stage was last trained with: the finished adapter's record, else the latest checkpoint's."""
    if not options.resume:
        return None
    if paths.has_adapter():
        run = read_metadata(paths.adapter).get("run")
        if isinstance(run, dict):
            return run
    latest = checkpoints.latest()
    return CheckpointManager.read_state(latest) if latest is not None else None


def _decide(
    paths: StagePaths,
    checkpoints: CheckpointManager,
    fingerprint: dict,
    options: RunOptions,
    name: str,
    progress: Progress,
) -> Path | str | None:
    """ "done", a checkpoint to resume from, or None to start over. Every refusal comes before any deletion."""
    identity, data_hash = fingerprint["identity"], fingerprint["data_hash"]
    redo = False
    if paths.has_adapter() and not options.overwrite:
        run = read_metadata(paths.adapter).get("run")
        if not options.resume or not isinstance(run, dict):
            raise UserError(
                f"{paths.adapter} already holds a finished adapter; pass --overwrite to replace it"
            )
        changes = fingerprint_changes(run, identity, data_hash)
        if not changes:
            progress.info(
                f"{name} is already complete: {paths.adapter} (pass --no-resume --overwrite to train again)"
            )
            return "done"
        redo = options.redo_on_new_start and all(change.startswith(START_CHANGE) for change in changes)
        if not redo:
            raise UserError(
                f"{paths.adapter} was trained with other settings: {'; '.join(changes[:4])}. Pass --no-resume "
                "--overwrite to train it again (the finished adapter is replaced only once the new one is "
                "complete), or restore the recipe and data it was trained with"
            )
        progress.warn(
            f"{name} is trained again: {changes[0]} (qalign run trains every stage after a changed one)"
        )
    latest = checkpoints.latest() if options.resume and not redo else None
    if latest is not None:
        changes = fingerprint_changes(CheckpointManager.read_state(latest), identity, data_hash)
        if changes and options.redo_on_new_start and all(c.startswith(START_CHANGE) for c in changes):
            progress.warn(
                f"{name} starts over: {changes[0]} (qalign run trains every stage after a changed one)"
            )
            latest = None
        elif changes and not options.force_resume:
            raise UserError(
                f"{latest}: changed since this checkpoint: {'; '.join(changes[:4])}. Resuming would not reproduce "
                "an uninterrupted run: pass --force-resume to continue anyway, or --no-resume to start over"
            )
        elif changes:
            progress.warn(f"resuming despite changes (--force-resume): {'; '.join(changes[:4])}")
    if latest is None:
        # Starting over: the earlier attempt's checkpoints and metrics go (never a finished adapter: it is
        # replaced only when the new one is complete).
        for path in (paths.checkpoints, paths.metrics, paths.tensorboard, paths.trackers):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    return latest


def plan_memory(
    recipe: Recipe,
    name: str,
    data: StageData,
    device: torch.device,
    earlier: dict,
    progress: Progress,
    processes: int = 1,
) -> tuple[Recipe, int | None]:
    """The recipe with the stage's `auto` memory settings resolved against the free memory, and the plan's
    total. On resume an `auto` takes the value the run was trained with, so it continues exactly as it started."""
    from qalign import memory, memory_auto, model_shapes

    spec: TrainSpec = getattr(recipe, name)
    try:
        config, source = model_shapes.load_config(recipe.model)
        arch = model_shapes.describe(config, recipe.model, source)
    except (UserError, ValueError, ImportError) as exc:
        # Training can still go ahead without a plan; `auto` then takes the schema's defaults.
        progress.warn(f"no memory plan: {exc}")
        resolved = {}
        if spec.gradient_checkpointing == "auto":
            resolved["gradient_checkpointing"] = earlier.get("gradient_checkpointing", True)
        if spec.batch_size == "auto":
            resolved["batch_size"] = earlier.get("batch_size", 4)
        if spec.packing == "auto":
            resolved["packing"] = False
        if spec.activation_offloading == "auto":
            resolved["activation_offloading"] = False
        return memory_auto.with_settings(recipe, name, resolved), None
    if spec.activation_offloading is True and device.type != "cuda":
        progress.info(
            f"{name}.activation_offloading: no effect on a CPU, where activations already are in RAM"
        )
    lengths = memory.lengths_of(data.train, name)
    free = memory_auto.free_memory(device.type)
    if device.type == "cpu":
        # Processes on one machine share its RAM (each GPU process has a GPU of its own).
        free //= processes
    resolved, decided = memory_auto.resolve_auto(arch, recipe, name, lengths, device.type, free, earlier)
    recipe = memory_auto.with_settings(recipe, name, resolved)
    plan = memory.estimate(arch, recipe, name, lengths, device.type, free)
    where = "free GPU memory" if device.type == "cuda" else "available RAM"
    if decided:
        progress.info(f"{'; '.join(decided)} (memory planner, {free / 2**30:.1f} GiB {where})")
    progress.info(
        f"plan: {plan.total_bytes / 2**30:.2f} GiB predicted for {device.type} "
        f"({where}: {free / 2**30:.1f} GiB; qalign plan shows the breakdown)"
    )
    ram = memory_auto.available_ram() // processes
    if plan.host_offload_bytes > ram:
        progress.warn(
            f"activation offloading will keep {plan.host_offload_bytes / 2**30:.1f} GiB in host memory, more "
            f"than the {ram / 2**30:.1f} GiB of RAM available{' to each process' if processes > 1 else ''}; "
            + (
                f"turn {name}.activation_offloading off"
                if plan.gradient_checkpointing
                else f"turn {name}.gradient_checkpointing on (it offloads only each layer's input)"
            )
        )
    whole = plan.components.get("base_weights", 0)
    if (
        processes > 1
        and device.type == "cuda"
        and recipe.distributed.strategy == "fsdp"
        and whole > ram * processes
    ):
        progress.warn(
            f"fsdp quantizes each process's copy of the model in host memory, one process at a time: "
            f"{whole / 2**30:.1f} GiB, more than the {ram * processes / 2**30:.1f} GiB of RAM available; "
            "free RAM (or add swap) before the run"
        )
    if plan.fits is False:
        progress.warn(
            f"the plan ({plan.total_bytes / 2**30:.2f} GiB) exceeds the {where} ({free / 2**30:.1f} GiB); "
            f"run qalign plan {recipe.source} --stage {name} for overrides that fit"
        )
    return recipe, plan.total_bytes


def load_model(
    recipe: Recipe,
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    start: Path | None,
    progress: Progress,
    sharded: bool = False,
) -> torch.nn.Module:
    """The 4-bit base with a trainable adapter: fresh, or continued from `start`."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    # Seeded before the adapter exists: LoRA's initial weights come from the global RNG.
    set_seed(recipe.seed)
    # fsdp is for models whose 4-bit weights do not fit one GPU: each process quantizes its copy in host memory
    # and sharding moves only its shard of each layer onto its GPU.
    load_on = torch.device("cpu") if sharded and device.type == "cuda" else device
    base = load_base(recipe.model, device, sharded, load_on)
    progress.info(
        f"base {recipe.model.base}: {footprint_bytes(base) / 2**20:,.1f} MiB in memory "
        f"({recipe.model.quantization}, compute {DTYPE_NAMES[dtype]}, {load_on.type})"
    )
    spec: TrainSpec = getattr(recipe, name)
    model = attach_lora(base, recipe.lora, spec.gradient_checkpointing, start)
    tune_lora_layers(model, dtype)
    if device.type == "cpu":
        fuse_rms_norms(model, dtype)
    trainable, total = count_parameters(model)
    source = f"from {start}" if start else f"r={recipe.lora.r}"
    progress.info(f"LoRA {source}: {trainable:,} trainable of {total:,} parameters ({trainable / total:.3%})")
    return model


def measured_peak() -> tuple[int, str]:
    """(bytes, kind): the CUDA allocator's peak on a GPU; on a CPU the process's peak resident set size."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
    import resource

    # Linux reports ru_maxrss in KiB.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "cpu_peak_rss"
