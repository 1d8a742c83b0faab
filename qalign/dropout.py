"""LoRA dropout on CPUs: a counter-based random mask, applied with bit operations.

On a CPU, torch's generator (MT19937) is sequential: on the 2-core Intel Xeon with AMX where this was
measured, drawing 16 random bits for each element of one [544, 512] adapter input took longer than that
layer's whole 4-bit matmul, and comparing, converting and masking with bool tensors cost as much again.
Here torch's generator gives one 64-bit seed per mask; the mask's bits come from a vectorised hash of
(seed, position) (a Weyl sequence through two multiply-xorshift rounds), four 15-bit lanes per 64-bit
word. A lane below p * 2^15 drops its element. The mask is kept as "keep bits", all ones where an element is
kept and zero where it is dropped, in the width of the activation's dtype, so applying it is one bitwise AND
on the activation's bits, forward and backward. The rescale by 1 / (1 - p) is a scalar the caller folds in.

p is rounded up to a multiple of 2^-15 (0.05 becomes 0.050018) and the rescale uses that rounded p, so the
expected output is still the input. The seed comes from torch's generator, so a seed, a resumed run and
gradient checkpointing's replayed forward (which restores the generator) all see the same mask.
"""

from __future__ import annotations

import math

import torch

LANE = 1 << 15
# 2^64 / golden ratio (the Weyl step), and the multiplier of a 64-bit xorshift-multiply mixer; as int64.
_WEYL = -7046029254386353131
_MIX = -2960836687051489901
_BITS = {2: torch.int16, 4: torch.int32}


def keep_bits(
    shape: torch.Size, p: float, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, float]:
    """(keep, scale): `keep` an integer tensor as wide as `dtype`, -1 (all bits) with probability 1 - p' and 0
    otherwise, p' being p rounded up to a multiple of 2^-15; `scale` = 1 / (1 - p')."""
    threshold = math.ceil(p * LANE)
    count = math.prod(shape)
    lanes = _hashed_words((count + 3) // 4, device).view(torch.int16)[:count].view(shape)
    # A lane's low 15 bits r are uniform on [0, 2^15); (threshold - 1 - r) >> 15 is -1 when r >= threshold (kept)
    # and 0 below it (dropped). Every step stays inside int16, in place.
    keep = lanes.bitwise_and_(LANE - 1).neg_().add_(threshold - 1).bitwise_right_shift_(15)
    width = _BITS[torch.empty((), dtype=dtype).element_size()]
    return (keep if width == torch.int16 else keep.to(width)), LANE / (LANE - threshold)


def masked(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x with its dropped elements zeroed (not rescaled)."""
    return torch.bitwise_and(x.view(keep.dtype), keep).view(x.dtype)


def mask_(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """`masked`, in place on x (which must own its memory)."""
    x.view(keep.dtype).bitwise_and_(keep)
    return x


def _hashed_words(count: int, device: torch.device) -> torch.Tensor:
    seed = int(torch.empty((), dtype=torch.int64).random_(-(1 << 63), (1 << 63) - 1))
    z = torch.arange(count, dtype=torch.int64, device=device).mul_(_WEYL).add_(seed)
    # torch's >> on int64 is arithmetic: it zeroes bit 63 of each xorshift's result and flips bits 32-62 by
    # it, which leaves every lane's low 15 bits (the only ones used) uniform.
    for _ in range(2):
        z.bitwise_xor_(z >> 32).mul_(_MIX)
    return z.bitwise_xor_(z >> 32)


class _Dropout(torch.autograd.Function):
    """x zeroed where dropped and scaled elsewhere, keeping only the keep bits for backward."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor, p: float) -> torch.Tensor:
        keep, scale = keep_bits(x.shape, p, x.dtype, x.device)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return masked(x, keep).mul_(scale)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (keep,) = ctx.saved_tensors
        return masked(grad, keep).mul_(ctx.scale), None


class UniformDropout(torch.nn.Dropout):
    """nn.Dropout with the mask above on CPUs (for dtypes 2 or 4 bytes wide); elsewhere torch's own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            not self.training
            or self.p == 0
            or self.p >= 1
            or x.device.type != "cpu"
            or x.element_size() not in _BITS
            or not x.is_floating_point()
        ):
            return super().forward(x)
        return _Dropout.apply(x, self.p)
