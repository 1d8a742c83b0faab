"""Peak memory of one SFT step with a small and a Llama-3-sized vocabulary, on CPU.

A tiny Llama (hidden 64, 2 layers) with a 1,000- and a 131,072-row vocabulary, 4-bit base with LoRA as
`qalign sft` loads it, fp32 compute, gradient checkpointing on, batch 1: one 2,048-token row whose last
2,037 positions are trained (a 10-token prompt). The step is sft_step (label_logprobs on the peft model),
backward, clipping and AdamW, measured as benchmarks/plan_accuracy.py measures: bytes live before the step +
the peak of the PyTorch profiler's allocation events during it (after a warm-up step).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/vocab_memory.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from plan_accuracy import Case, _shape, build_model, measure_parts, predict, recipe_for  # noqa: E402

MiB = 2**20
VOCABS = (1000, 131072)


def case_for(vocab: int) -> Case:
    shape = dict(_shape(64, 128, 2, 4, 2, vocab), max_position_embeddings=4096)
    return Case(f"llama-tiny-v{vocab}", "LlamaConfig", shape, "sft", 1, 2048, True, dtype="fp32", prompt=10)


def main() -> None:
    from qalign.cli import _quiet_libraries

    _quiet_libraries()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in VOCABS:
            case = case_for(vocab)
            recipe = recipe_for(case, build_model(case, Path(tmp) / case.name), Path(tmp) / f"run-{vocab}")
            before, step = measure_parts(case, recipe)
            rows.append((vocab, before, step, predict(case, recipe)))
    print("| vocab | live before the step MiB | step peak above it MiB | peak MiB | planned MiB |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for vocab, before, step, planned in rows:
        print(
            f"| {vocab} | {before / MiB:.1f} | {step / MiB:.1f} | {(before + step) / MiB:.1f} "
            f"| {planned / MiB:.1f} |"
        )
    (_, b1, s1, _), (_, b2, s2, _) = rows
    print(f"131k minus 1k, peak: {(b2 + s2 - b1 - s1) / MiB:.1f} MiB; step only: {(s2 - s1) / MiB:.1f} MiB")


if __name__ == "__main__":
    main()
