"""RMSNorm as one autograd node on a CPU: transformers' forward, bit for bit, with a cheaper backward.

Llama's RMSNorm (and the families that copy it: Mistral, Qwen2, Qwen3, Phi-3) upcasts its input to fp32,
multiplies by the reciprocal root mean square, casts back and multiplies by its weight. Run by autograd, those
are eight nodes that keep an fp32 copy of the input (twice the bf16 activation), each with a backward pass over
activation-sized tensors: on the 2-core Intel AMX Xeon of benchmarks/RESULTS.md, 3.3-3.7 ms
forward and backward for a [4, 256, 512] bf16 input. The node here computes the same forward with the same
operations in the same order (so its output is identical: a swapped class is checked against the original
before it is used), keeps the input as it came (the residual stream, in the compute dtype) and the per-row
reciprocal, and computes the input's gradient in one function: 1.9-2.2 ms for the same input, and half the
bytes saved per norm in bf16. In whole DPO steps there it was faster in 8 of 8 alternating pairs of runs
(benchmarks/RESULTS_NOTES.md). The gradient is the same function rounded differently, as any change of operation
order rounds it (within one bf16 step of autograd's on the test shapes, tests/test_rmsnorm.py).

Only frozen norm weights take this path (LoRA trains none); a trainable weight keeps transformers' forward. GPUs
keep transformers' forward too until the node is measured there, as qalign/lora.py's does.
"""

from __future__ import annotations

import torch

_FUSED: dict[type, type] = {}
_SAME: dict[tuple[type, torch.dtype], bool] = {}


class _RMSNorm(torch.autograd.Function):
    """y = w * (x * rsqrt(mean(x^2) + eps)) in fp32, cast back to x's dtype before the weight multiplies it."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        upcast = x.to(torch.float32)
        rstd = torch.rsqrt(upcast.pow(2).mean(-1, keepdim=True) + eps)
        normed = upcast * rstd
        del upcast
        ctx.save_for_backward(x, rstd, weight)
        return weight * normed.to(x.dtype)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple:
        x, rstd, weight = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        # The gradient reaching the cast-back normalized input, in that tensor's dtype as autograd has it.
        upstream = (grad * weight).to(x.dtype).to(torch.float32)
        normed = x.to(torch.float32) * rstd
        # d/dx of x * rsqrt(mean(x^2) + eps): rstd * (g - normed * mean(g * normed)).
        dot = (upstream * normed).mean(-1, keepdim=True)
        grad_x = upstream.sub_(normed.mul_(dot)).mul_(rstd)
        return grad_x.to(x.dtype), None, None


def _forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if self.weight.requires_grad or x.device.type != "cpu":
        return self._transformers_forward(x)
    return _RMSNorm.apply(x, self.weight, self.variance_epsilon)


def fuse_rms_norms(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Give every Llama-style RMSNorm of `model` the node above, class by class, where a probe input in
    `dtype` gives exactly the original forward's output. Returns how many modules run it; state dicts and
    parameters are untouched."""
    changed = 0
    for module in model.modules():
        cls = type(module)
        if cls in _FUSED.values():
            changed += 1
            continue
        if not looks_like_rms_norm(module):
            continue
        if (cls, dtype) not in _SAME:
            _SAME[cls, dtype] = _same_output(module, dtype)
        if _SAME[cls, dtype]:
            if cls not in _FUSED:
                _FUSED[cls] = type(
                    cls.__name__, (cls,), {"forward": _forward, "_transformers_forward": cls.forward}
                )
            module.__class__ = _FUSED[cls]
            changed += 1
    return changed


def looks_like_rms_norm(module: torch.nn.Module) -> bool:
    """Shaped like Llama's RMSNorm (a 1-D weight, a float variance_epsilon, no children); fuse_rms_norms also
    checks its output. Works on meta tensors, for the planner."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__.endswith("RMSNorm")
        and isinstance(getattr(module, "variance_epsilon", None), float)
        and isinstance(weight, torch.nn.Parameter)
        and weight.dim() == 1
        and next(module.children(), None) is None
    )


def _same_output(module: torch.nn.Module, dtype: torch.dtype) -> bool:
    """Whether the node computes what the module's own forward does, to the bit, on a probe input: a family
    whose RMSNorm differs (Gemma's 1 + weight, an fp32 product) keeps its own forward."""
    weight = module.weight
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(2, 3, weight.shape[0], generator=generator).mul_(3).to(weight.device, dtype)
    with torch.no_grad():
        expected = type(module).forward(module, probe)
        got = _RMSNorm.apply(probe, weight, module.variance_epsilon)
    return expected.dtype == got.dtype and torch.equal(expected, got)
