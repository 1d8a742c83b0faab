"""Forward + backward time of the loss head alone on CPU: the code before this loss head (autograd through
fixed 2048-token chunks of cross_entropy), the shipped one (gradient per unit upstream gradient computed in the
forward: two matrix multiplies with the head), and the other exact design considered (logits recomputed in the
backward under autograd: three). Medians of several repetitions; the head is frozen, as in QLoRA.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/loss_head_speed.py
"""

from __future__ import annotations

import statistics
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

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
        logits = _model_logit_transform(base.config, base.head(hidden[start : start + 2048]).float())
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


if __name__ == "__main__":
    main()
