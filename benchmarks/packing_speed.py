"""Micro-batch layouts on mixed-length data, timed forward + backward through qalign's own step functions.

    PYTHONPATH=. python benchmarks/packing_speed.py [--model small] [--rounds 5] [--batches 6]

Layouts (the same micro-batches of the same examples in each):
  padded           collate_sft / collate_dpo: one row per example (DPO: per pair), padded to the longest
  packed-dense     SFT only: one row, positions restarting, no segments: transformers' sdpa then detects the
                   packing from the positions and builds a [1, 1, T, T] block-diagonal mask
  packed           one row, attention per example (qalign/packing.py): what `packing: true` runs
Rounds alternate the layouts; the figures are medians over rounds with the spread (min-max) of tokens/s,
tokens being the examples' real tokens. Speed depends on the CPU and on what else runs on it.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_setup import build_model, mixed_length

from qalign.chat_template import IGNORE
from qalign.dpo import DpoExample, collate_dpo, collate_dpo_packed, sequence_logprobs
from qalign.logprobs import label_logprobs
from qalign.sft import SftExample, collate_sft, collate_sft_packed, sft_step


def sft_examples(rng: random.Random, n: int, vocab: int) -> list[SftExample]:
    out = []
    for _ in range(n):
        prompt, response = mixed_length(rng), mixed_length(rng)
        ids = [rng.randrange(3, vocab) for _ in range(prompt + response)]
        out.append(SftExample(ids, [IGNORE] * prompt + ids[prompt:], "x"))
    return out


def dpo_examples(rng: random.Random, n: int, vocab: int) -> list[DpoExample]:
    out = []
    for _ in range(n):
        prompt = [rng.randrange(3, vocab) for _ in range(mixed_length(rng))]
        sides = [[rng.randrange(3, vocab) for _ in range(mixed_length(rng))] for _ in range(2)]
        ids = [prompt + side for side in sides]
        labels = [[IGNORE] * len(prompt) + side for side in sides]
        out.append(DpoExample(ids[0], labels[0], ids[1], labels[1], "x", prompt))
    return out


def dense_sft_step(model: torch.nn.Module, batch: dict, norm: int) -> torch.Tensor:
    logps, _ = label_logprobs(model, batch["input_ids"], None, batch["labels"], batch["position_ids"])
    return -logps.sum() / norm


def dpo_step(model: torch.nn.Module, batch: dict, norm: int) -> torch.Tensor:
    sums, _ = sequence_logprobs(model, batch)
    return -sums.sum() / norm


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="small")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=6, help="micro-batches timed per layout and round")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--stage", choices=["sft", "dpo"], default="sft")
    args = parser.parse_args()

    from qalign.lora import tune_lora_layers
    from qalign.model import attach_lora, compute_dtype, load_base
    from qalign.recipe import LoraSpec, ModelSpec

    folder = Path(tempfile.mkdtemp()) / "model"
    build_model(args.model, folder)
    device = torch.device("cpu")
    spec = ModelSpec(base=str(folder), quantization="nf4")
    dtype = compute_dtype("auto", device)
    torch.manual_seed(0)
    model = attach_lora(load_base(spec, device), LoraSpec(r=16, alpha=32, dropout=0.0), False, None)
    tune_lora_layers(model, dtype)
    model.train()
    vocab = model.get_input_embeddings().weight.shape[0]
    rng = random.Random(0)
    n = args.batches * args.batch_size
    examples = (sft_examples if args.stage == "sft" else dpo_examples)(rng, n, vocab)
    batches = [examples[i : i + args.batch_size] for i in range(0, n, args.batch_size)]
    if args.stage == "sft":
        tokens = sum(len(e.input_ids) for e in examples)
        layouts = {
            "padded": (lambda b: collate_sft(b, 0), lambda m, b, k: sft_step(m, b, k)[0]),
            "packed-dense": (collate_sft_packed, dense_sft_step),
            "packed": (collate_sft_packed, lambda m, b, k: sft_step(m, b, k)[0]),
        }
    else:
        tokens = sum(len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
        layouts = {
            "padded": (lambda b: collate_dpo(b, 0), dpo_step),
            "packed": (lambda b: collate_dpo_packed(b, 0), dpo_step),
        }
    padded_tokens = sum(
        collate_sft(b, 0)["input_ids"].numel()
        if args.stage == "sft"
        else collate_dpo(b, 0)["input_ids"].numel()
        for b in batches
    )
    print(
        f"{args.stage}, model {args.model}, {DTYPE.get(dtype, dtype)}, {args.batches} micro-batches of "
        f"{args.batch_size}: {tokens} real tokens, {padded_tokens} in padded rows "
        f"({1 - tokens / padded_tokens:.0%} padding), {torch.get_num_threads()} threads",
        flush=True,
    )
    # Each micro-batch runs in every layout back to back (the order alternating), so a slowdown from whatever
    # else the machine runs hits the layouts of one micro-batch alike: the ratios pair them.
    seconds: dict[str, list[float]] = {name: [] for name in layouts}
    ratios: dict[str, list[float]] = {name: [] for name in layouts}
    for round_ in range(args.rounds + 1):
        for index, batch in enumerate(batches):
            order = list(layouts) if (round_ + index) % 2 == 0 else list(reversed(layouts))
            took = {}
            for name in order:
                collate, step = layouts[name]
                began = time.perf_counter()
                data = collate(batch)
                with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                    loss = step(model, data, 100)
                loss.backward()
                model.zero_grad(set_to_none=True)
                took[name] = time.perf_counter() - began
            if round_ > 0:  # round 0 warms up
                for name in layouts:
                    seconds[name].append(took[name])
                    ratios[name].append(took["padded"] / took[name])
        if round_ > 0:
            line = ", ".join(
                f"{name} {tokens / sum(seconds[name][-len(batches) :]):,.0f}" for name in layouts
            )
            print(f"  round {round_}: tok/s {line}", flush=True)
    for name in layouts:
        per_round = [
            tokens / sum(seconds[name][i : i + len(batches)])
            for i in range(0, len(seconds[name]), len(batches))
        ]
        quartiles = statistics.quantiles(ratios[name], n=4)
        print(
            f"  {name:13} median {statistics.median(per_round):6,.0f} tok/s (rounds {min(per_round):,.0f}-"
            f"{max(per_round):,.0f}); speed vs padded, per micro-batch: median x{statistics.median(ratios[name]):.2f}"
            f" (quartiles x{quartiles[0]:.2f}-x{quartiles[2]:.2f}, {len(ratios[name])} pairs)"
        )


DTYPE = {torch.bfloat16: "bf16", torch.float32: "fp32"}

if __name__ == "__main__":
    main()
