"""How peft's LoRA layers run inside qalign: multiplied in the compute dtype, with a cheaper dropout on CPUs.

peft keeps adapter weights in fp32 (the optimizer needs the precision: a bf16 weight would round away most
small updates) and, to multiply with them, casts every adapter's input to fp32. With a bf16 base that cast
costs an fp32 copy of the input per adapted layer, kept alive for backward, and fp32 matmuls. Here the
weights stay fp32 but are cast to the input's dtype for the multiply, as mixed-precision training does: the
adapter's input is the very tensor the base layer already keeps, and its gradient still lands in fp32. What it
pays for is memory, not speed: the bytes saved for backward drop by over 20% on the test model
(tests/test_lora.py), which is what the planner counts and what a GPU run is short of, while on the benchmark's
CPU the bf16 adapter matmuls measured 0.91-0.92x as fast as peft's fp32 ones (benchmarks/RESULTS.md).

On a CPU, torch's generator (MT19937) spends about as long per draw whatever the draw's width, and a float
uniform per element makes the dropout mask a sizeable share of a LoRA step (more under gradient
checkpointing, which draws it twice). Here each 64-bit draw gives four 16-bit lanes, each compared with
p * 2^16: the mask costs a third of `torch.rand(...) >= p` and a fifth of `nn.Dropout`'s Bernoulli sampler.
p is rounded up to a multiple of 2^-16 (0.05 becomes 0.050003) and the rescale uses that rounded p, so the
expected output is still the input. The draws come from torch's generator, so a seed, a resumed run and
checkpointing's replayed forward all see the same mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class ComputeDtypeLinear(torch.nn.Linear):
    """An adapter's A or B matrix: fp32 parameters, multiplied in whatever dtype its input arrives in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        bias = self.bias if self.bias is None or self.bias.dtype == x.dtype else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)


LANES = 1 << 16


def drop_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """A bool mask that is True (drop) with probability p' (p rounded up to a multiple of 2^-16), and the
    1 / (1 - p') that rescales the kept elements."""
    threshold = math.ceil(p * LANES)
    count = math.prod(shape)
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device)
    # The full int64 range: every bit of every draw is uniform, so each 16-bit lane is.
    words.random_(-(1 << 63), (1 << 63) - 1)
    lanes = words.view(torch.int16)[:count].view(shape)
    return lanes < threshold - (1 << 15), LANES / (LANES - threshold)


class _MaskedScale(torch.autograd.Function):
    """x zeroed where dropped and scaled elsewhere, keeping only the bool mask (one byte per element) for
    backward. masked_fill takes the bool mask as it is; `x * mask` would first convert it to x's dtype."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor, drop: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(drop)
        ctx.scale = scale
        return x.masked_fill(drop, 0).mul_(scale)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (drop,) = ctx.saved_tensors
        return grad.masked_fill(drop, 0).mul_(ctx.scale), None, None


class UniformDropout(torch.nn.Dropout):
    """nn.Dropout with the mask from `drop_mask` on CPUs; on GPUs, torch's fused kernel is faster."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or self.p >= 1 or x.device.type != "cpu":
            return super().forward(x)
        drop, scale = drop_mask(x.shape, self.p, x.device)
        return _MaskedScale.apply(x, drop, scale)


def tune_lora_layers(model: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """Apply the two changes above to every LoRA layer of a peft model (saved adapters are unaffected: no
    parameter or state-dict key changes)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for dropout in module.lora_dropout.values():
            if type(dropout) is torch.nn.Dropout:
                dropout.__class__ = UniformDropout
        if compute_dtype != torch.bfloat16:
            # fp16 activations would carry the adapter's gradients without loss scaling; keep peft's fp32 path.
            continue
        for linear in (*module.lora_A.values(), *module.lora_B.values()):
            if type(linear) is torch.nn.Linear:
                linear.__class__ = ComputeDtypeLinear
        module.cast_input_dtype_enabled = False
