"""How peft's LoRA layers run inside qalign: multiplied in the compute dtype, with a cheaper dropout on CPUs.

peft keeps adapter weights in fp32 (the optimizer needs the precision: a bf16 weight would round away most
small updates) and, to multiply with them, casts every adapter's input to fp32. With a bf16 base that cast
costs an fp32 copy of the input per adapted layer, kept alive for backward, and fp32 matmuls. Here the
weights stay fp32 but are cast to the input's dtype for the multiply, as mixed-precision training does: the
adapter's input is the very tensor the base layer already keeps, and its gradient still lands in fp32.

On a CPU, `nn.Dropout` draws its mask through a Bernoulli sampler about 1.7x slower than drawing uniforms and
comparing; the mask is the same distribution either way (fp32 uniforms, so `p` is exact to 2^-24).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ComputeDtypeLinear(torch.nn.Linear):
    """An adapter's A or B matrix: fp32 parameters, multiplied in whatever dtype its input arrives in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        bias = self.bias if self.bias is None or self.bias.dtype == x.dtype else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)


class _MaskedScale(torch.autograd.Function):
    """x * keep / (1 - p), keeping only the bool mask (one byte per element) for backward."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x * keep * scale

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        return grad * keep * ctx.scale, None, None


class UniformDropout(torch.nn.Dropout):
    """nn.Dropout with the mask drawn as `uniform >= p` on CPUs; on GPUs, torch's fused kernel is faster."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        keep = torch.rand(x.shape, device=x.device) >= self.p
        return _MaskedScale.apply(x, keep, 1.0 / (1.0 - self.p))


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
