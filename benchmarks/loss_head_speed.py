"""Forward + backward time of the loss head alone on CPU: the code before this loss head (autograd through
fixed 2048-token chunks of cross_entropy), the shipped one (gradient per unit upstream gradient computed in the
forward: two matrix multiplies with the head), and the other exact design considered (logits recomputed in the
backward under autograd: three). Medians of several repetitions; the head is frozen, as in QLoRA.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/loss_head_speed.py           # the loss head alone
    PYTHONPATH=$PWD .venv/bin/python benchmarks/loss_head_speed.py --steps   # whole SFT and DPO steps
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from qalign.logprobs import _model_logit_transform, chunk_tokens, selective_logprobs

# (trained tokens, hidden, vocab): benchmarks/bench.py's small model at batch 4, and a big vocabulary.
SHAPES = [(512, 512, 8192), (2048, 512, 8192), (2037, 64, 131072)]


class _Base(torch.nn.Module):
    def __init__(self, head: torch.nn.Linear) -> None:
        super().__init__()
        self.head, self.config = head, SimpleNamespace()

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.head


def before(base: _Base, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    out = []
    for start in range(0, hidden.shape[0], 2048):
        head = base.get_output_embeddings()
        logits = _model_logit_transform(base.config, head(hidden[start : start + 2048]).float())
        out.append(-F.cross_entropy(logits, targets[start : start + 2048], reduction="none"))
    return torch.cat(out)


class _Recompute(torch.autograd.Function):
    """Keeps nothing per token; the backward recomputes each chunk under autograd."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, config, chunk):
        out = torch.cat(
            [
                -F.cross_entropy(
                    _model_logit_transform(config, F.linear(hidden[s : s + chunk], weight).float()),
                    targets[s : s + chunk],
                    reduction="none",
                )
                for s in range(0, hidden.shape[0], chunk)
            ]
        )
        ctx.save_for_backward(hidden, weight, targets)
        ctx.config, ctx.chunk = config, chunk
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets = ctx.saved_tensors
        grads = []
        for s in range(0, hidden.shape[0], ctx.chunk):
            piece = hidden[s : s + ctx.chunk].detach().requires_grad_()
            with torch.enable_grad():
                logits = _model_logit_transform(ctx.config, F.linear(piece, weight).float())
                logp = -F.cross_entropy(logits, targets[s : s + ctx.chunk], reduction="none")
                (g,) = torch.autograd.grad(logp, piece, grad[s : s + ctx.chunk])
            grads.append(g)
        return torch.cat(grads), None, None, None, None


def recompute(base: _Base, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    chunk = chunk_tokens(base.head.weight.shape[0])
    return _Recompute.apply(hidden, base.head.weight, targets, base.config, chunk)


def timed(compute, base: _Base, hidden: torch.Tensor, targets: torch.Tensor, reps: int) -> float:
    times = []
    for _ in range(reps + 1):
        start = time.perf_counter()
        leaf = hidden.detach().requires_grad_()
        compute(base, leaf, targets).sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main(reps: int = 5) -> None:
    torch.manual_seed(0)
    print("| tokens | hidden | vocab | dtype | before ms | shipped ms | recompute-in-backward ms |")
    print("| ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    for tokens, hidden_size, vocab in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            head = torch.nn.Linear(hidden_size, vocab, bias=False).to(dtype).requires_grad_(False)
            base = _Base(head)
            hidden = torch.randn(tokens, hidden_size, dtype=dtype)
            targets = torch.randint(0, vocab, (tokens,))
            ms = [
                1000 * timed(f, base, hidden, targets, reps) for f in (before, selective_logprobs, recompute)
            ]
            name = str(dtype).removeprefix("torch.")
            print(
                f"| {tokens} | {hidden_size} | {vocab} | {name} | "
                + " | ".join(f"{m:.1f}" for m in ms)
                + " |"
            )


def training_steps(reps: int = 6, dtype: str = "auto") -> None:
    """One SFT and one DPO micro-step (forward + backward, checkpointing on) of benchmarks/bench.py's small model,
    batch 4, alternating the loss head before and the shipped one on the same model and batch, so a busy
    machine slows both alike."""
    import tempfile
    from pathlib import Path

    import bench_setup
    from plan_accuracy import Case, _examples

    from qalign import logprobs
    from qalign.dpo import collate_dpo, disable_dropout, make_dpo_step
    from qalign.lora import tune_lora_layers
    from qalign.model import attach_lora, compute_dtype, load_base
    from qalign.recipe import DpoSpec, LoraSpec, ModelSpec
    from qalign.sft import collate_sft, sft_step

    shipped = logprobs.selective_logprobs
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        bench_setup.build_model("small", folder)
        spec = ModelSpec(base=str(folder), compute_dtype=dtype)
        model = attach_lora(
            load_base(spec, torch.device("cpu")), LoraSpec(r=16, alpha=32, dropout=0.05), True
        )
        tune_lora_layers(model, compute_dtype(dtype, torch.device("cpu")))
        model.train()
        shape = bench_setup.MODELS["small"][1]
        sft = collate_sft(_examples(Case("s", "", shape, "sft", 4, 184, True), shape["vocab_size"]), 0)
        pairs = _examples(Case("s", "", shape, "dpo", 4, 184, True), shape["vocab_size"])
        dpo = collate_dpo(pairs, 0)
        dpo_step = make_dpo_step(DpoSpec(data={"train": "x.jsonl"}), None)
        print(f"| stage | dtype | before ms | shipped ms | shipped / before |  ({reps} steps each, medians)")
        for stage, step, batch in (("sft", sft_step, sft), ("dpo", dpo_step, dpo)):
            if stage == "dpo":
                disable_dropout(model)
            norm = int((batch["labels"] != -100).sum())
            times: dict[str, list[float]] = {"before": [], "shipped": []}
            for rep in range(reps + 1):
                for name, head in (("before", before), ("shipped", shipped))[:: 1 if rep % 2 else -1]:
                    logprobs.selective_logprobs = head
                    start = time.perf_counter()
                    step(model, batch, norm)[0].backward()
                    if rep:  # the first of each is a warm-up
                        times[name].append(time.perf_counter() - start)
                    model.zero_grad(set_to_none=True)
            logprobs.selective_logprobs = shipped
            old, new = (1000 * statistics.median(times[k]) for k in ("before", "shipped"))
            print(f"| {stage} | {dtype} | {old:.0f} | {new:.0f} | {new / old:.3f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", action="store_true", help="time whole training steps instead")
    parser.add_argument("--dtype", default="auto", help="with --steps: the compute dtype")
    parser.add_argument("--reps", type=int, default=6)
    args = parser.parse_args()
    if args.steps:
        training_steps(args.reps, args.dtype)
    else:
        main(args.reps)
