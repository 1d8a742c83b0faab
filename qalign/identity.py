"""What a stage's result depends on, so that a resume, a re-run or an export can tell whether it still holds.

A stage's identity is the recipe settings that change what it trains (not where or how often it saves, logs or
evaluates), the compute dtype `auto` resolved to on this machine, and the adapter it started from. Together
with a digest of the tokenized data it is written into every checkpoint and into the finished adapter.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qalign.adapter import adapter_digest, read_metadata
from qalign.layout import RunLayout, starting_adapter
from qalign.recipe import Recipe

# packing changes the layout of a micro-batch, not its examples or its step (to rounding): a run may resume in
# the other layout, and runs from before the key existed resume as they are. activation_offloading changes
# where saved tensors wait, not their bits: a run that ran out of memory may resume with it on.
BOOKKEEPING = {
    "save_every",
    "save_total_limit",
    "eval_every",
    "log_every",
    "nan_policy",
    "packing",
    "activation_offloading",
}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def stage_identity(
    recipe: Recipe, name: str, dtype: torch.dtype, start: Path | None, processes: int = 1
) -> dict:
    """The settings a checkpoint must share with the recipe to resume exactly. `grad_accum` is recorded times
    the processes: a step takes the same examples for the same product, so a run resumes under another process
    count with the same global batch."""
    dumped = recipe.model_dump(mode="json")
    section = {k: v for k, v in dumped[name].items() if k not in BOOKKEEPING}
    section["grad_accum"] *= processes
    section["data"] = {k: v for k, v in section["data"].items() if not k.startswith("eval")}
    # Where the start is read from is not the start itself: a moved output_dir must still resume.
    section.pop("init_adapter", None)
    # Keys only one loss reads (any other holds them at their defaults): DPO runs from before they existed resume.
    for key, loss in (("simpo_gamma", "simpo"), ("desirable_weight", "kto"), ("undesirable_weight", "kto")):
        if name == "dpo" and section.get("loss") != loss:
            section.pop(key, None)
    if name == "dpo" and not section.get("rpo_alpha"):
        section.pop("rpo_alpha", None)  # off: runs from before the key existed resume
    model = dict(dumped["model"])
    # `auto` resolves per machine (bf16 on a CPU with native bf16, fp32 on another): a resume elsewhere must not
    # silently continue in another precision.
    model["resolved_compute_dtype"] = DTYPE_NAMES[dtype]
    identity = {"seed": dumped["seed"], "model": model, "lora": dumped["lora"], name: section}
    if start is not None:
        identity["start"] = {"adapter": adapter_digest(start)}
    return identity


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`key: old -> new` for every leaf that differs between two nested dicts, in the user's key names."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(differences(a, b, f"{prefix}{key}."))
        elif a != b:
            out.append(_describe(f"{prefix}{key}", a, b))
    return out


START_CHANGE = "the starting adapter"


def _describe(key: str, old: object, new: object) -> str:
    if key in ("start", "start.adapter"):
        return f"{START_CHANGE} ({_start_story(old, new)})"
    if key.endswith(".grad_accum"):
        return f"{key} x processes: {old!r} -> {new!r}"
    return f"{key}: {old!r} -> {new!r}"


def _start_story(old: object, new: object) -> str:
    if old is None:
        return "it was trained from the base alone; now there is an adapter to start from"
    if new is None:
        return "it was trained from an adapter that is no longer there"
    return "it was trained from an earlier version of the adapter it starts from"


def fingerprint_changes(recorded: dict | None, identity: dict, data_hash: str) -> list[str]:
    """What differs between a recorded {identity, data_hash} and this run's."""
    if recorded is None:
        return []
    changes = differences(recorded.get("identity", {}), identity)
    if recorded.get("data_hash") != data_hash:
        changes.append("the training data (or its tokenization)")
    return changes


def stale_start(recipe: Recipe) -> str | None:
    """Why the run's DPO adapter no longer follows from where DPO starts now (the SFT adapter was trained or
    retrained after it), or None when it does or there is nothing to compare."""
    dpo = RunLayout(recipe.out).stage("dpo")
    if recipe.dpo is None or not dpo.has_adapter():
        return None
    run = read_metadata(dpo.adapter).get("run")
    if not isinstance(run, dict):
        return None
    start = starting_adapter(recipe)
    now = {"adapter": adapter_digest(start)} if start is not None else None
    recorded = run.get("identity", {}).get("start")
    if recorded == now:
        return None
    return f"{dpo.adapter} is stale: {_start_story(recorded, now)}"
