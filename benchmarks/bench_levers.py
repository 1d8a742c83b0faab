"""Switches that turn one of qalign's optimizations off, so the benchmark can measure what each one is worth.

They replace a qalign function inside the benchmark's worker process only; qalign itself has no such switches.
Levers that are recipe keys (dpo.reference, gradient_checkpointing) are measured with `--set` instead.
"""

from __future__ import annotations

import torch

LEVERS = {
    "selective-head": "LM head and log-softmax only at trained positions (off: full [batch, length, vocab] logits)",
    "shared-prompt": "DPO prompt computed once per pair, chosen and rejected in one row (off: a row each, one pass)",
    "concat-forward": "chosen and rejected in one forward pass (off: a row each and one pass for each side; "
    "against the row above, this lever alone)",
    "fused-lora": "each LoRA layer on the 4-bit base as one autograd node (off: peft's chain of base matmul, "
    "clone, dropout, A, B, scaling and add, with qalign's dropout mask and bf16 adapter matmuls)",
    "lora-layer": "everything qalign/lora.py and qalign/dropout.py change (off: peft's own LoRA layers: "
    "nn.Dropout's Bernoulli mask, every adapter input cast to fp32)",
    "fused-rmsnorm": "each RMSNorm as one autograd node keeping its input, on a CPU (qalign/rmsnorm.py; off: "
    "transformers' own, eight nodes keeping an fp32 copy)",
    "keep-freed-memory": "freed memory kept by malloc for the next step, on a CPU (qalign/allocator.py; off: "
    "glibc's defaults, which give it back to the kernel and fault it in again)",
}


def full_logits_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    packed: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What label_logprobs computes, the plain way: logits at every position, a full log-softmax, then a gather."""
    from qalign.chat_template import IGNORE

    inputs = {"attention_mask": attention_mask, **(packed or {})}
    if position_ids is not None:
        inputs["position_ids"] = position_ids
    logits = model(input_ids=input_ids, use_cache=False, **inputs).logits[:, :-1].float()
    targets = labels[:, 1:]
    keep = targets != IGNORE
    logps = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(targets)[keep]
    return logps[keep], rows


def apply_levers(off: list[str]) -> None:
    unknown = sorted(set(off) - set(LEVERS))
    if unknown:
        raise SystemExit(f"unknown lever(s) {unknown}; known: {sorted(LEVERS)}")
    from qalign import dpo, reference, runner, sft

    if "keep-freed-memory" in off:
        runner.keep_freed_memory = lambda: False
    if "fused-rmsnorm" in off:
        runner.fuse_rms_norms = lambda model, dtype: 0
    if "lora-layer" in off:
        runner.tune_lora_layers = lambda model, dtype: None
    elif "fused-lora" in off:
        import qalign.lora

        qalign.lora._on_4bit = lambda layer: False

    if "selective-head" in off:
        sft.label_logprobs = full_logits_logprobs
        dpo.label_logprobs = full_logits_logprobs
    if "shared-prompt" in off or "concat-forward" in off:
        separate = "concat-forward" in off

        def unshared(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
            split = dpo.split_pair_rows(batch)
            pairs = batch["input_ids"].shape[0]
            parts = [slice(0, pairs), slice(pairs, None)] if separate else [slice(None)]
            logps, rows = [], []
            for part in parts:
                got, where = dpo.label_logprobs(
                    model, split["input_ids"][part], split["attention_mask"][part], split["labels"][part]
                )
                logps.append(got)
                rows.append(where + (part.start or 0))
            logps, rows = torch.cat(logps), torch.cat(rows)
            sums = torch.zeros(2 * pairs, dtype=logps.dtype, device=logps.device).index_add(0, rows, logps)
            ones = torch.ones_like(rows)
            return sums, torch.zeros(2 * pairs, dtype=torch.long, device=rows.device).index_add(0, rows, ones)

        dpo.sequence_logprobs = unshared
        reference.sequence_logprobs = unshared
        # unshared splits padded pair rows: the packed row (which collate_dpo_packed makes) stays padded here.
        dpo.collate_dpo_packed = dpo.collate_dpo
