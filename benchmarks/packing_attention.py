"""One attention layer's cost for a packed micro-batch, forward and backward, three ways:

  segmented  SDPA once per example, causal (qalign/packing.py: what `packing` runs)
  dense      SDPA once over the packed row with a block-diagonal causal mask (what transformers builds from
             restarting position ids, and what TRL's padding_free runs on sdpa)
  padded     SDPA over one padded row per example, with a padding and causal mask

    python benchmarks/packing_attention.py

The benchmark model's attention shape (8 heads of 64, bf16), examples of mixed length (bench_setup.py: prompt
and response each 8-300 tokens); the three ways alternate, medians of 15.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_setup import mixed_length

HEADS, DIM, DTYPE = 8, 64, torch.bfloat16


def measure(lengths: list[int], reps: int = 15) -> dict[str, float]:
    total, longest = sum(lengths), max(lengths)
    ends = torch.tensor(lengths).cumsum(0).tolist()
    starts = [0, *ends[:-1]]
    example = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    index = torch.arange(total)
    dense_mask = (example[:, None] == example[None, :]) & (index[None, :] <= index[:, None])
    padded_mask = torch.zeros(len(lengths), 1, longest, longest, dtype=torch.bool)
    for row, n in enumerate(lengths):
        padded_mask[row, 0, :, :n] = True
    padded_mask &= torch.ones(longest, longest, dtype=torch.bool).tril()

    def tensors(batch: int, length: int) -> list[torch.Tensor]:
        return [torch.randn(batch, HEADS, length, DIM, dtype=DTYPE, requires_grad=True) for _ in range(3)]

    q, k, v = tensors(1, total)
    qp, kp, vp = tensors(len(lengths), longest)
    ways = {
        "segmented": lambda: torch.cat(
            [
                F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True)
                for s, e in zip(starts, ends, strict=True)
            ],
            dim=2,
        ),
        "dense": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask),
        "padded": lambda: F.scaled_dot_product_attention(qp, kp, vp, attn_mask=padded_mask),
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    for rep in range(reps):
        for name in list(ways) if rep % 2 else list(reversed(ways)):
            began = time.perf_counter()
            ways[name]().sum().backward()
            times[name].append(time.perf_counter() - began)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    rng = random.Random(1)
    for count in (4, 8, 16):
        lengths = [mixed_length(rng) + mixed_length(rng) for _ in range(count)]
        medians = measure(lengths)
        print(
            f"{count} examples, {sum(lengths)} tokens (longest {max(lengths)}): "
            + ", ".join(f"{name} {seconds * 1e3:.1f} ms" for name, seconds in medians.items())
        )


if __name__ == "__main__":
    main()
