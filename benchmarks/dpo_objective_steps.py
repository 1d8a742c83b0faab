"""Step time of the DPO stage's objectives on the benchmark's small 4-bit llama (bench_setup.py) on CPU: sigmoid with a live reference (an extra
no-grad forward every step), sigmoid with the cached reference, and the reference-free simpo and orpo (no
reference at all: no precompute pass either, whose time is printed too). The variants run round-robin over the
same batches, so load from other processes falls on each alike; medians after one warm-up batch.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/dpo_objective_steps.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_setup import build_model
from conftest import preference_rows

from qalign.data import Row
from qalign.dpo import collate_dpo, disable_dropout, make_dpo_step, prepare_dpo
from qalign.model import attach_lora, load_base
from qalign.progress import Progress
from qalign.recipe import DpoSpec, LoraSpec, ModelSpec
from qalign.reference import compute_reference
from qalign.reference_free import make_reference_free_step

PAIRS, BATCH = 56, 8


def main(folder: Path) -> None:
    build_model("small", folder)  # the benchmark's ~27M llama (bench_setup.py)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    spec = ModelSpec(base=str(folder), compute_dtype="fp32")
    model = attach_lora(
        load_base(spec, torch.device("cpu")), LoraSpec(r=8, alpha=16), gradient_checkpointing=False
    )
    disable_dropout(model)
    model.train()
    rows = [Row(f"r{i}", row) for i, row in enumerate(preference_rows(PAIRS))]
    examples, _ = prepare_dpo(rows, tokenizer, 128, "drop", "bench")
    start = time.perf_counter()
    cached = compute_reference(
        model, examples, BATCH, tokenizer.pad_token_id, torch.device("cpu"), Progress(), "train"
    )
    print(
        f"reference precompute pass, {len(examples)} pairs: {time.perf_counter() - start:.2f} s (not needed by simpo, orpo)"
    )

    dpo = DpoSpec(data={"train": "x"})
    variants = [
        ("sigmoid, live reference", make_dpo_step(dpo, None), False),
        ("sigmoid, cached reference", make_dpo_step(dpo, None), True),
        ("simpo", make_reference_free_step(DpoSpec(data={"train": "x"}, loss="simpo")), False),
        ("orpo", make_reference_free_step(DpoSpec(data={"train": "x"}, loss="orpo")), False),
    ]
    times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    for index in range(0, len(examples), BATCH):
        chunk = examples[index : index + BATCH]
        for name, step, use_cache in variants:
            for example, values in zip(chunk, cached[index : index + BATCH].tolist(), strict=True):
                example.reference = tuple(values) if use_cache else None
            batch = collate_dpo(chunk, tokenizer.pad_token_id)
            start = time.perf_counter()
            loss, _ = step(model, batch, len(chunk))
            loss.backward()
            if index:  # the first batch warms up
                times[name].append(time.perf_counter() - start)
            model.zero_grad()
    for name, values in times.items():
        print(f"{name:26s} median step ({BATCH} pairs, forward + backward, {len(values)} steps): "
              f"{statistics.median(values) * 1000:.0f} ms")  # fmt: skip


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        main(Path(tmp))
