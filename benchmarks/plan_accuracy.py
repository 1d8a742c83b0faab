"""How close `qalign plan` is to what a training step really allocates, on CPU.

For each case (architecture shape, stage, micro-batch, length, gradient checkpointing) it builds a tiny
random-weight model, loads it in 4 bits with LoRA exactly as `qalign sft`/`qalign dpo` do, runs one warm-up
step (so AdamW's states exist), then profiles a second step with the PyTorch profiler's memory accounting and
integrates its allocation events. Measured peak = bytes live before the step (weights, quantization constants,
adapter, optimizer states: summed from the tensors themselves) + the highest point of the allocation curve.

    .venv/bin/python benchmarks/plan_accuracy.py            # prints the table, writes benchmarks/PLAN_RESULTS.md
"""

from __future__ import annotations

import datetime
import platform
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


@dataclass(frozen=True)
class Case:
    name: str
    config: str  # a transformers config class
    shape: dict
    stage: str  # sft | dpo
    batch: int
    seq: int
    checkpointing: bool
    attn: str | None = None
    dtype: str = "auto"  # the recipe's model.compute_dtype
    prompt: int | None = None  # prompt tokens of each row; None: PROMPT_SHARE of it
    packing: bool = False  # the recipe's packing: the micro-batch in one row (collate_*_packed)


def _shape(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int) -> dict:
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=1024,
    )


LLAMA_S = _shape(64, 128, 2, 4, 2, 1000)
LLAMA_M = _shape(256, 688, 4, 8, 4, 4000)
QWEN_M = _shape(192, 512, 3, 6, 2, 3000)
LLAMA_WIDE = _shape(512, 1376, 2, 8, 8, 1000)

BF16 = [
    Case("llama-s", "LlamaConfig", LLAMA_S, "sft", 4, 64, False, dtype="bf16"),
    Case("llama-s", "LlamaConfig", LLAMA_S, "sft", 4, 64, True, dtype="bf16"),
    Case("llama-m", "LlamaConfig", LLAMA_M, "sft", 2, 128, False, dtype="bf16"),
    Case("llama-m", "LlamaConfig", LLAMA_M, "sft", 8, 128, True, dtype="bf16"),
    Case("llama-m", "LlamaConfig", LLAMA_M, "sft", 1, 512, False, dtype="bf16"),
    Case("qwen2-m", "Qwen2Config", QWEN_M, "sft", 4, 256, False, dtype="bf16"),
    Case("qwen2-m", "Qwen2Config", QWEN_M, "sft", 4, 256, True, dtype="bf16"),
    Case("llama-wide", "LlamaConfig", LLAMA_WIDE, "sft", 2, 256, False, dtype="bf16"),
    Case("llama-s", "LlamaConfig", LLAMA_S, "dpo", 4, 64, False, dtype="bf16"),
    Case("llama-m", "LlamaConfig", LLAMA_M, "dpo", 2, 128, True, dtype="bf16"),
    Case("qwen2-m", "Qwen2Config", QWEN_M, "dpo", 2, 256, False, dtype="bf16"),
    Case("llama-wide", "LlamaConfig", LLAMA_WIDE, "dpo", 1, 256, True, dtype="bf16"),
]
FP32 = [replace(BF16[i], dtype="fp32") for i in (0, 1, 3, 4, 5, 7, 8, 10)]
# Packed micro-batches (one row, attention per example): SFT with and without checkpointing, DPO.
PACKED = [replace(BF16[i], packing=True) for i in (2, 3, 8)]
# Vocabularies of Llama 3 (128k) and Gemma (256k) on a tiny body, where the loss head is most of the step.
LLAMA_V131K = dict(_shape(64, 128, 2, 4, 2, 131072), max_position_embeddings=4096)
LLAMA_V256K = _shape(64, 128, 2, 4, 2, 262144)
GEMMA2_V256K = dict(_shape(64, 128, 2, 4, 2, 262144), head_dim=16)  # softcapped logits, eager attention
BIG_VOCAB = [
    Case("llama-v131k", "LlamaConfig", LLAMA_V131K, "sft", 1, 2048, True, dtype="fp32", prompt=10),
    Case("llama-v131k", "LlamaConfig", LLAMA_V131K, "sft", 1, 2048, True, dtype="bf16", prompt=10),
    Case("llama-v131k", "LlamaConfig", LLAMA_V131K, "dpo", 1, 1024, True, dtype="fp32"),
    Case("llama-v256k", "LlamaConfig", LLAMA_V256K, "sft", 2, 512, False, dtype="bf16"),
    Case("llama-v256k", "LlamaConfig", LLAMA_V256K, "dpo", 2, 256, True, dtype="bf16"),
    Case("gemma2-v256k", "Gemma2Config", GEMMA2_V256K, "sft", 2, 256, True, dtype="fp32"),
    Case("gemma2-v256k", "Gemma2Config", GEMMA2_V256K, "dpo", 1, 256, False, dtype="bf16"),
]
# bf16 first: what `compute_dtype: auto` gives on CPUs with native bf16.
CASES = BF16 + FP32 + PACKED + BIG_VOCAB
# A few quick cases for the test suite: both dtypes, SFT with and without checkpointing, DPO, and a 128k
# vocabulary.
FAST_CASES = [BF16[0], BF16[1], BF16[8], FP32[0], FP32[6], BIG_VOCAB[2]]

PROMPT_SHARE = 0.25  # the first quarter of each row is prompt (not trained)


def build_model(case: Case, folder: Path) -> Path:
    import transformers
    from transformers import AutoModelForCausalLM

    if (folder / "config.json").exists():
        return folder
    config = getattr(transformers, case.config)(**case.shape, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def recipe_for(case: Case, model: Path, out: Path):
    from qalign.recipe_load import parse_recipe

    section = (
        f"{case.stage}:\n  data: {{train: x.jsonl}}\n  batch_size: {case.batch}\n  max_length: {case.seq}\n"
        f"  gradient_checkpointing: {str(case.checkpointing).lower()}\n  packing: {str(case.packing).lower()}\n"
    )
    attn = f"  attn_implementation: {case.attn}\n" if case.attn else ""
    text = (
        f"name: plan\noutput_dir: {out}\nmodel:\n  base: {model}\n  compute_dtype: {case.dtype}\n{attn}"
        f"lora: {{r: 8, alpha: 16, dropout: 0.05}}\n{section}"
    )
    (out / "x.jsonl").parent.mkdir(parents=True, exist_ok=True)
    (out / "x.jsonl").write_text("{}\n")
    return parse_recipe(text, out / "recipe.yaml", [])


def predict(case: Case, recipe) -> int:
    from qalign.memory import estimate, lengths_of
    from qalign.model_shapes import describe, load_config

    config, source = load_config(recipe.model)
    arch = describe(config, recipe.model, source)
    # The planner reads the same examples the measured step trains on, through the runner's lengths_of.
    lengths = lengths_of(_examples(case, arch.vocab), case.stage)
    return estimate(arch, recipe, case.stage, lengths, "cpu").total_bytes


def _examples(case: Case, vocab: int) -> list:
    """Random-token examples of `case.seq` tokens, the first PROMPT_SHARE of them prompt. SFT: with several rows
    the last is an eighth shorter, so the batch is padded (and attention gets a mask) as real data is. DPO:
    chosen and rejected share their prompt, so collate_dpo's rows hold it once."""
    from qalign.dpo import DpoExample
    from qalign.sft import SftExample

    generator = torch.Generator().manual_seed(0)
    prompt = int(case.seq * PROMPT_SHARE) if case.prompt is None else case.prompt

    def tokens(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=generator).tolist()

    if case.stage == "sft":
        lengths = [case.seq] * case.batch
        if case.batch > 1:
            lengths[-1] -= case.seq // 8
        return [SftExample(ids, [-100] * prompt + ids[prompt:], "x") for ids in map(tokens, lengths)]
    examples = []
    for _ in range(case.batch):
        shared = tokens(prompt)
        sides = [shared + tokens(case.seq - prompt) for _ in "cr"]
        labels = [[-100] * prompt + side[prompt:] for side in sides]
        examples.append(
            DpoExample(sides[0], labels[0], sides[1], labels[1], "x", shared, reference=(0.0, 0.0, 1, 1))
        )
    return examples


def _batch(case: Case, vocab: int) -> dict[str, torch.Tensor]:
    # Each stage's own collate, so the measured layout is the one training uses.
    from qalign.dpo import collate_dpo, collate_dpo_packed
    from qalign.sft import collate_sft, collate_sft_packed

    examples = _examples(case, vocab)
    if case.stage == "dpo":
        return (collate_dpo_packed if case.packing else collate_dpo)(examples, 0)
    return collate_sft_packed(examples) if case.packing else collate_sft(examples, 0)


def _live_bytes(tensors: list[torch.Tensor]) -> int:
    seen, total = set(), 0
    for tensor in tensors:
        parts = [tensor]
        state = getattr(tensor, "quant_state", None)
        while state is not None:
            parts += [t for t in (state.absmax, state.code, state.offset) if isinstance(t, torch.Tensor)]
            state = getattr(state, "state2", None)
        for part in parts:
            storage = part.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def measure(case: Case, recipe) -> int:
    """Peak bytes of live tensors during one training step (after a warm-up step)."""
    return sum(measure_parts(case, recipe))


def measure_parts(case: Case, recipe) -> tuple[int, int]:
    """(bytes of live tensors before the step, the highest the step's allocations rise above that)."""
    from torch.profiler import ProfilerActivity, profile

    from qalign.dpo import disable_dropout, make_dpo_step
    from qalign.lora import tune_lora_layers
    from qalign.model import attach_lora, compute_dtype, load_base
    from qalign.rmsnorm import fuse_rms_norms
    from qalign.sft import sft_step

    device = torch.device("cpu")
    base = load_base(recipe.model, device)
    model = attach_lora(base, recipe.lora, case.checkpointing)
    dtype = compute_dtype(recipe.model.compute_dtype, device)
    tune_lora_layers(model, dtype)
    fuse_rms_norms(model, dtype)  # as runner.load_model does on a CPU
    step_loss = sft_step
    if case.stage == "dpo":
        disable_dropout(model)
        step_loss = make_dpo_step(recipe.dpo, None)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch = _batch(case, base.config.vocab_size)

    def step() -> None:
        loss, _ = step_loss(model, batch, int((batch["labels"] != -100).sum()))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    states = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    before = _live_bytes([*model.parameters(), *model.buffers(), *states, *batch.values()])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = highest = 0
    for _, delta in events:
        live += delta
        highest = max(highest, live)
    return before, highest


def run(cases: list[Case], root: Path) -> list[tuple[Case, int, int]]:
    from qalign.cli import _quiet_libraries

    _quiet_libraries()
    results = []
    for index, case in enumerate(cases):
        model = build_model(case, root / f"{case.name}")
        recipe = recipe_for(case, model, root / f"run-{index}")
        results.append((case, predict(case, recipe), measure(case, recipe)))
    return results


def table(results: list[tuple[Case, int, int]]) -> str:
    lines = [
        "| model | stage | dtype | batch | length | checkpointing | layout | predicted MiB | measured MiB | error |",
        "| --- | --- | --- | ---: | ---: | --- | --- | ---: | ---: | ---: |",
    ]
    for case, predicted, measured in results:
        error = (predicted - measured) / measured
        lines.append(
            f"| {case.name} | {case.stage} | {case.dtype} | {case.batch} | {case.seq} | {'on' if case.checkpointing else 'off'} "
            f"| {'packed' if case.packing else 'padded'} | {predicted / 2**20:.2f} | {measured / 2**20:.2f} | {error:+.1%} |"
        )
    return "\n".join(lines)


def main() -> None:
    import bitsandbytes
    import peft
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        results = run(CASES, Path(tmp))
    body = table(results)
    print(body)
    worst = max(abs(p - m) / m for _, p, m in results)
    shapes = "\n".join(f"- {name}: {shape}" for name, shape in _shapes().items())
    report = (
        "# qalign plan: predicted vs measured peak memory (CPU)\n\n"
        f"- date: {datetime.date.today().isoformat()}\n"
        f"- machine: {platform.machine()}, {platform.processor() or 'cpu'}, {torch.get_num_threads()} threads, "
        f"{platform.system()} {platform.release()}\n"
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}\n"
        "- command: `.venv/bin/python benchmarks/plan_accuracy.py`\n"
        "- measured: bytes of live tensors before the step (from the tensors) + the peak of the PyTorch "
        "profiler's allocation events during one step (forward, backward, clipping, AdamW), after a warm-up step\n"
        "- predicted: `total_bytes` of the CPU plan (no CUDA context), from the examples' lengths as "
        "`memory.lengths_of` reads them; LoRA r=8 on all linear layers, dropout 0.05 (SFT; DPO turns it off)\n"
        "- compute dtype: the `dtype` column (the recipe's `model.compute_dtype`): bf16 for every case, which "
        "`auto` gives on CPUs with AVX512-BF16/AMX, and fp32 for "
        f"{len(FP32)} of them (`auto` elsewhere)\n"
        f"- data: random tokens; {PROMPT_SHARE:.0%} of every row is prompt (not trained); SFT batches of several "
        "rows have one row an eighth shorter (padded, so attention gets a mask); DPO pairs share their prompt, "
        "so each pair is one row (prompt once, then chosen and rejected) and uses cached reference log-probs\n"
        "- GPU: none was used, so the CUDA plan (CUDA context, allocator overhead) is not measured here\n\n"
        f"{body}\n\nworst error: {worst:.1%}\n\nShapes (NF4 + double quant, sdpa attention):\n\n{shapes}\n"
    )
    (ROOT / "benchmarks" / "PLAN_RESULTS.md").write_text(report, encoding="utf-8")
    print(f"worst error {worst:.1%}; wrote benchmarks/PLAN_RESULTS.md")


def _shapes() -> dict:
    return {c.name: c.shape for c in CASES}


if __name__ == "__main__":
    main()
