"""Reference log-probs for DPO, computed once per dataset and cached on disk.

The reference is the model DPO starts from, so before the first step the policy *is* the reference: one
no-grad pass of the policy itself gives every reference log-prob, with no second model and no adapter
switching. The cache key covers the tokenized data (so template and max_length changes) and the starting
weights, so resume, later epochs and re-runs reuse it and anything else recomputes it.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load, save

from qalign.atomic import atomic_write_bytes
from qalign.distributed import SINGLE, World, any_rank, barrier, gather_rows, is_sharded, main_decides
from qalign.dpo import DpoExample, collate_dpo, sequence_logprobs
from qalign.progress import Progress


def cache_key(examples_digest: str, starting_point: dict) -> str:
    payload = json.dumps({"data": examples_digest, "start": starting_point}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


@torch.no_grad()
def compute_reference(
    model: torch.nn.Module,
    examples: list[DpoExample],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    progress: Progress,
    label: str,
    rounds: int = 0,
    filler: list[DpoExample] | None = None,
    skip_adapter: bool | None = None,
) -> torch.Tensor:
    """[N, 4] float64: reference (chosen, rejected) summed log-probs and (chosen, rejected) response lengths.

    A sharded model gathers its weights from every rank in each forward, so every rank must run as many:
    `rounds` forwards at least, the missing ones on `filler` (results dropped). `skip_adapter`: whether the
    adapter adds nothing (the ranks' common answer under fsdp; by default this model's)."""
    was_training = model.training
    model.eval()
    out = torch.zeros(len(examples), 4, dtype=torch.float64)
    skip_adapter = adds_nothing(model) if skip_adapter is None else skip_adapter
    skip = model.disable_adapter() if skip_adapter else nullcontext()
    starts = list(range(0, len(examples), batch_size))

    def batch_of(chunk: list[DpoExample]) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in collate_dpo(chunk, pad_id).items() if k != "reference"}

    with skip, progress.bar(f"reference {label}", len(examples), 0, unit=noun(examples)) as bar:
        for start in starts:
            chunk = examples[start : start + batch_size]
            sums, counts = sequence_logprobs(model, batch_of(chunk))
            half = len(chunk)
            out[start : start + half, 0] = sums[:half].double().cpu()
            out[start : start + half, 1] = sums[half:].double().cpu()
            out[start : start + half, 2] = counts[:half].double().cpu()
            out[start : start + half, 3] = counts[half:].double().cpu()
            bar.update(start + half, {})
        for _ in range(rounds - len(starts)):
            sequence_logprobs(model, batch_of(filler or examples[:1]))
    model.train(was_training)
    return out


def noun(examples: list[DpoExample]) -> str:
    """ "pair" for DPO's examples, "row" for KTO's unpaired ones: what the messages count."""
    return examples[0].noun if examples else DpoExample.noun


def adds_nothing(model: torch.nn.Module) -> bool:
    """A fresh LoRA adapter starts with every B matrix zero, so the base alone computes exactly the same
    log-probs, without the adapter's matmuls."""
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    # A sharded weight answers for this rank's shard (to_local): the ranks then agree through any_rank.
    local = [p.to_local() if hasattr(p, "to_local") else p for p in lora_b]
    return bool(lora_b) and hasattr(model, "disable_adapter") and not any(bool(p.any()) for p in local)


def attach_reference(
    model: torch.nn.Module,
    examples: list[DpoExample],
    cache: Path,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    progress: Progress,
    label: str,
    world: World = SINGLE,
) -> None:
    """Fill every example's `reference` from the cache file, computing and saving it when missing. With more
    than one process each rank computes a contiguous share of the examples and rank 0 writes the whole."""

    def read() -> torch.Tensor | None:
        values = None
        if cache.exists():
            try:
                values = load(cache.read_bytes())["reference"]
            except Exception:  # a damaged cache is only a lost speed-up: recompute it
                progress.warn(f"{cache}: unreadable reference cache; recomputing")
            if values is not None and values.shape != (len(examples), 4):
                values = None
        return values

    values = main_decides(read, world)
    if values is None:
        per_rank = -(-len(examples) // world.size)
        mine = examples[world.rank * per_rank : (world.rank + 1) * per_rank]
        sharding = {}
        if is_sharded(model):
            # Rank 0's share is the largest: every rank runs its number of batches.
            sharding = {
                "rounds": -(-per_rank // batch_size),
                "filler": examples[:1],
                "skip_adapter": not any_rank(not adds_nothing(model), world),
            }
        part = compute_reference(model, mine, batch_size, pad_id, device, progress, label, **sharding)
        values = gather_rows(part, world)
        if world.main:
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(cache, save({"reference": values}))
        barrier(world)
        progress.info(f"reference log-probs for {len(examples)} {label} {noun(examples)}s cached in {cache}")
    else:
        progress.info(f"reference log-probs for {label} read from {cache}")
    for example, row in zip(examples, values.tolist(), strict=True):
        example.reference = (row[0], row[1], int(row[2]), int(row[3]))
