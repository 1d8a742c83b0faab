"""What the memory planner decides: the `auto` values of a stage (gradient_checkpointing, batch_size,
packing, activation_offloading), the smallest change that fits when a plan does not (`qalign plan`'s
suggestions, the advice after running out of memory), and how much memory there is to fit in. The arithmetic
of one plan is qalign/memory.py's estimate.
"""

from __future__ import annotations

import os
import re

import torch

from qalign.errors import UserError
from qalign.memory import CUDA_CONTEXT, Lengths, Plan, estimate
from qalign.model_shapes import Architecture, describe, load_config
from qalign.recipe import Recipe, TrainSpec


def suggest(
    arch: Architecture, recipe: Recipe, stage: str, lengths: Lengths, plan: Plan
) -> tuple[list[str], str]:
    """The smallest change that fits, as `--set` override strings (without the `--set`), and a note."""
    if plan.fits is not False:
        return [], ""
    spec: TrainSpec = getattr(recipe, stage)

    offload = plan.activation_offloading

    def fits(**kwargs: object) -> Plan | None:
        options = {
            "batch_size": plan.batch_size,
            "gradient_checkpointing": plan.gradient_checkpointing,
            "activation_offloading": offload,
        }
        options.update(kwargs)
        candidate = estimate(arch, recipe, stage, lengths, plan.target, plan.limit, **options)
        return candidate if candidate.fits else None

    # 1. gradient checkpointing: same results, about a third more compute.
    if not plan.gradient_checkpointing and fits(gradient_checkpointing=True):
        return [f"{stage}.gradient_checkpointing=true"], "same results, about a third slower"
    ckpt = [f"{stage}.gradient_checkpointing=true"] if not plan.gradient_checkpointing else []
    # 1b. activation offloading (a GPU only): same results, a copy of each layer's input to host and back;
    # kept in whatever else must change, as it costs less than any of it.
    if plan.target == "cuda" and not offload:
        offload = True
        if fits(gradient_checkpointing=True):
            return [*ckpt, f"{stage}.activation_offloading=true"], "same results, a little slower"
        ckpt = [*ckpt, f"{stage}.activation_offloading=true"]
    # 2. a smaller micro-batch, with accumulation keeping the effective batch.
    accum = spec.grad_accum
    effective = plan.batch_size * accum
    for smaller in range(plan.batch_size - 1, 0, -1):
        if effective % smaller == 0 and fits(batch_size=smaller, gradient_checkpointing=True):
            return (
                [*ckpt, f"{stage}.batch_size={smaller}", f"{stage}.grad_accum={effective // smaller}"],
                f"same effective batch of {effective}",
            )
    # 3. a shorter max_length, at batch 1 with checkpointing.
    base = [
        *ckpt,
        *([f"{stage}.batch_size=1", f"{stage}.grad_accum={effective}"] if plan.batch_size > 1 else []),
    ]
    length = plan.seq_len
    while length > 16:
        length = int(length * 0.875) // 8 * 8
        if fits(batch_size=1, gradient_checkpointing=True, max_length=length):
            over = sum(1 for n in lengths.lengths if n > length)
            what = "truncated" if spec.overlong == "truncate" else "dropped"
            note = f"{over} of {len(lengths.lengths)} examples would be {what}" if lengths.lengths else ""
            return [*base, f"{stage}.max_length={length}"], note
    # 4. a smaller LoRA rank.
    rank = recipe.lora.r
    while rank > 1:
        rank //= 2
        if fits(batch_size=1, gradient_checkpointing=True, max_length=16, rank=rank):
            return [*base, f"{stage}.max_length=16", f"lora.r={rank}"], "a much smaller run"
    return [], "nothing fits: the base model alone is too large for this memory"


# The share of the free memory an `auto` setting may plan to use.
AUTO_SHARE = 0.85


def resolve_auto(
    arch: Architecture,
    recipe: Recipe,
    stage: str,
    lengths: Lengths,
    target: str,
    limit: int | None,
    earlier: dict | None = None,
) -> tuple[dict, list[str]]:
    """Values for the stage's `auto` gradient_checkpointing, batch_size, activation_offloading and packing, and a
    line on each decision.

    gradient_checkpointing: off when the plan fits 85% of `limit` without it (at the recipe's batch size, or 1 when
    that is auto too), else on. batch_size: the largest power of two, up to 64 on a GPU and 8 on a CPU (where
    bigger batches barely speed anything up), whose plan fits 85% of it. Without a limit: checkpointing on, batch 4.
    activation_offloading: on a GPU, on when the plan at those values does not fit 85% of `limit` without it.
    Values in `earlier` (what a checkpoint was trained with) win, so a resumed run stays exact."""
    spec: TrainSpec = getattr(recipe, stage)
    earlier = earlier or {}
    cap = 64 if target == "cuda" else 8

    def fits(**options: object) -> bool:
        if limit is None:
            return False
        # Headroom: the plan is within ~15% on a CPU, and the free memory can shrink while the run goes on.
        return estimate(arch, recipe, stage, lengths, target, **options).total_bytes <= AUTO_SHARE * limit

    resolved: dict = {}
    decided = []
    checkpointing = spec.gradient_checkpointing
    if checkpointing == "auto":
        checkpointing = earlier.get("gradient_checkpointing")
        if not isinstance(checkpointing, bool):
            trial = spec.batch_size if isinstance(spec.batch_size, int) else 1
            checkpointing = limit is None or not fits(batch_size=trial, gradient_checkpointing=False)
        resolved["gradient_checkpointing"] = checkpointing
        decided.append(f"{stage}.gradient_checkpointing auto -> {str(checkpointing).lower()}")
    if spec.batch_size == "auto":
        value = earlier.get("batch_size")
        if not isinstance(value, int):
            value = 4 if limit is None else 1
            while (
                limit is not None
                and value * 2 <= cap
                and fits(batch_size=value * 2, gradient_checkpointing=checkpointing)
            ):
                value *= 2
        resolved["batch_size"] = value
        decided.append(f"{stage}.batch_size auto -> {value}")
    from qalign.packing import check_packing, packs

    batch = resolved.get("batch_size", spec.batch_size)
    if spec.activation_offloading == "auto":
        # Only where it is needed to fit: it costs a copy each way per layer, and on a CPU it does nothing.
        offload = (
            target == "cuda"
            and limit is not None
            and not fits(batch_size=batch, gradient_checkpointing=checkpointing, activation_offloading=False)
        )
        resolved["activation_offloading"] = offload
        if target == "cuda":
            decided.append(f"{stage}.activation_offloading auto -> {str(offload).lower()}")
    if spec.packing is True:
        check_packing(arch, recipe, stage, lengths)
    elif spec.packing == "auto":
        on, why = packs(arch, recipe, stage, lengths, batch)
        resolved["packing"] = on
        decided.append(f"{stage}.packing auto -> {str(on).lower()}" + ("" if on else f" ({why})"))
    return resolved, decided


def with_settings(recipe: Recipe, stage: str, settings: dict) -> Recipe:
    """A copy of `recipe` whose `stage` section has `settings` (the validated recipe itself is never edited)."""
    if not settings:
        return recipe
    spec = getattr(recipe, stage).model_copy(update=settings)
    return recipe.model_copy(update={stage: spec})


def free_memory(target: str) -> int:
    """What a run on `target` may use: free GPU memory (with the CUDA context it will create) or available RAM.
    The one rule for a run's `auto` settings and for `qalign plan`."""
    if target == "cuda":
        # mem_get_info creates the CUDA context, so what it reports free is already net of it.
        return torch.cuda.mem_get_info()[0] + CUDA_CONTEXT
    return available_ram()


def plan_recipe(recipe: Recipe, stage: str, limit: int | None, lengths: Lengths) -> tuple[Plan, list[str]]:
    """`qalign plan`: the plan of one stage for the data's `lengths`, its `auto` values resolved and its
    suggestions filled in. Without a `limit`, the memory this machine has free, as a run would."""
    config, source = load_config(recipe.model)
    arch = describe(config, recipe.model, source)
    target = "cuda" if limit is not None or torch.cuda.is_available() else "cpu"
    if limit is None:
        limit = free_memory(target)
    resolved, decided = resolve_auto(arch, recipe, stage, lengths, target, limit)
    recipe = with_settings(recipe, stage, resolved)
    plan = estimate(arch, recipe, stage, lengths, target, limit)
    plan.suggestions, plan.suggestion_note = suggest(arch, recipe, stage, lengths, plan)
    return plan, decided


def parse_size(text: str) -> int:
    """'8GiB', '8GB', '8000MiB', '8G', '12.5 GiB' or a number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise UserError(f"--gpu-memory {text}: expected a size like 8GiB, 8GB, 8000MiB or a number of bytes")
    number, unit = match.groups()
    # 'GB' as printed on GPU boxes and by nvidia-smi means GiB; both spellings are read as binary.
    power = " KMGT".index(unit.upper() or " ")
    value = int(float(number) * 1024**power)
    if value <= 0:
        raise UserError(f"--gpu-memory {text}: must be more than 0")
    return value


def available_ram() -> int:
    """Memory the system can give this process without swapping (MemAvailable), in bytes."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def out_of_memory_advice(stage: str, spec: TrainSpec, step: int) -> str:
    """What to change after running out of GPU memory at `step`, most result-preserving first."""
    cuda = torch.cuda.is_available()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    total = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 0.0
    fixes = []
    if not spec.gradient_checkpointing:
        fixes.append(f"--set {stage}.gradient_checkpointing=true")
    if spec.activation_offloading is not True:
        fixes.append(f"--set {stage}.activation_offloading=true (same results)")
    if spec.batch_size > 1:
        fixes.append(
            f"--set {stage}.batch_size={spec.batch_size // 2} --set {stage}.grad_accum={spec.grad_accum * 2} "
            "(same effective batch)"
        )
    fixes.append(f"--set {stage}.max_length={max(64, spec.max_length // 2)}")
    return (
        f"out of GPU memory at step {step} (peak {peak:.1f} GiB allocated of {total:.1f} GiB); "
        f"the last checkpoint is kept. Try: {'; or '.join(fixes)}"
    )
