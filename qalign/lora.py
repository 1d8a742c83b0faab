"""A cheaper dropout for peft's LoRA layers on CPUs.

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


def tune_lora_layers(model: torch.nn.Module) -> None:
    """Give every LoRA layer of a peft model the dropout above (saved adapters are unaffected: no parameter or
    state-dict key changes)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for dropout in module.lora_dropout.values():
            if type(dropout) is torch.nn.Dropout:
                dropout.__class__ = UniformDropout
