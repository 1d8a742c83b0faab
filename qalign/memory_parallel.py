"""Memory with more than one process (`--nproc`): each process's share of the one-process plan, under ddp and
under fsdp (qalign/distributed.py)."""

from __future__ import annotations

from dataclasses import replace

from qalign.memory import Plan
from qalign.model_shapes import describe, load_config
from qalign.recipe import Recipe


def per_process(plan: Plan, layers: int, processes: int, strategy: str) -> Plan:
    """The plan of each of `processes` processes (`--nproc`). ddp: the whole model on each, plus DDP's bucket
    copy of the adapter's gradients for the all-reduce. fsdp: the decoder layers' weights (the 4-bit base's
    included) and the adapter with its gradients and AdamW's moments split over the processes, plus two layers
    gathered whole (the running one and the next, prefetched); the embedding (gathered with the root unit
    for the whole step) and the LM head stay whole. Activations are each process's own micro-batch's."""
    if processes <= 1:
        return plan
    components = dict(plan.components)
    if strategy == "ddp":
        components["ddp_gradient_buckets"] = components["lora_gradients"]
    else:
        detail = plan.base_detail
        whole = detail.get("embeddings", 0) + detail.get("lm_head", 0) + detail.get("buffers", 0)
        layered = components["base_weights"] - whole
        per_layer = (layered + components["lora_weights"]) / max(layers, 1)
        gradients_per_layer = components["lora_gradients"] / max(layers, 1)
        components["base_weights"] = whole + -(-layered // processes)
        for key in ("lora_weights", "lora_gradients", "optimizer_states"):
            components[key] = -(-components[key] // processes)
        components["fsdp_gathered_layers"] = int(2 * per_layer)
        # A layer's adapter gradients, whole, until they are reduce-scattered into each process's shard.
        components["fsdp_gradient_buffers"] = int(2 * gradients_per_layer)
    note = f"{processes} processes, {strategy}: the figures are each process's"
    return replace(
        plan, components={k: int(v) for k, v in components.items()}, assumptions=[*plan.assumptions, note]
    )


def per_process_plans(recipe: Recipe, plan: Plan, processes: int) -> dict[str, Plan]:
    """`qalign plan --nproc N`: each process's plan under each strategy."""
    config, source = load_config(recipe.model)
    layers = describe(config, recipe.model, source).layers
    return {strategy: per_process(plan, layers, processes, strategy) for strategy in ("ddp", "fsdp")}
