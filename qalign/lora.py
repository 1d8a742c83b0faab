"""How peft's LoRA layers run inside qalign: multiplied in the compute dtype, with a cheaper dropout on CPUs.

peft keeps adapter weights in fp32 (the optimizer needs the precision: a bf16 weight would round away most
small updates) and, to multiply with them, casts every adapter's input to fp32. With a bf16 base that cast
costs an fp32 copy of the input per adapted layer, kept alive for backward, and fp32 matmuls. Here the
weights stay fp32 but are cast to the input's dtype for the multiply, as mixed-precision training does: the
adapter's input is the very tensor the base layer already keeps, and its gradient still lands in fp32. What it
pays for is memory, not speed: the bytes saved for backward drop by over 20% on the test model
(tests/test_lora.py), which is what the planner counts and what a GPU run is short of, while on the benchmark's
AMD CPU of 2026-11-29 the bf16 adapter matmuls measured 0.91-0.92x as fast as peft's fp32 ones. On a CPU the
fused node below does the same multiply in the compute dtype; this layer serves peft's path (GPUs).

On a CPU, every LoRA layer on a 4-bit base runs as one autograd node (`_LoraOn4bit`) instead of peft's
chain of base matmul, defensive clone, dropout, A, B, scaling and add, and its dropout is qalign/dropout.py's
(peft's nn.Dropout is swapped for it where the node does not run). The node pays in memory, not speed: on the
Intel AMX CPU of benchmarks/RESULTS.md, training memory fell 36% in SFT and 20% in DPO while tokens/s stayed
within the run-to-run noise (0.98x, 1.08x). GPUs keep peft's path until it is measured there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qalign.dropout import UniformDropout, keep_bits, mask_, masked


class ComputeDtypeLinear(torch.nn.Linear):
    """An adapter's A or B matrix: fp32 parameters, multiplied in whatever dtype its input arrives in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        bias = self.bias if self.bias is None or self.bias.dtype == x.dtype else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)


def tune_lora_layers(model: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """Apply the changes here to every LoRA layer of a peft model (saved adapters are unaffected: no
    parameter or state-dict key changes)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for dropout in module.lora_dropout.values():
            if type(dropout) is torch.nn.Dropout:
                dropout.__class__ = UniformDropout
        if compute_dtype in (torch.bfloat16, torch.float32) and _on_4bit(module):
            module.__class__ = _fused_class(type(module))
        if compute_dtype != torch.bfloat16:
            # fp16 activations would carry the adapter's gradients without loss scaling; keep peft's fp32 path.
            continue
        for linear in (*module.lora_A.values(), *module.lora_B.values()):
            if type(linear) is torch.nn.Linear:
                linear.__class__ = ComputeDtypeLinear
        module.cast_input_dtype_enabled = False


class _LoraOn4bit(torch.autograd.Function):
    """y = x W^T (+ bias) + s * dropout(x) A^T B^T for a frozen 4-bit W, as one autograd node.

    peft runs this as seven operations: the base matmul, a defensive clone of its output, the dropout, A, B, a
    scaling multiply and an add, each but A and B a pass over an activation-sized tensor, forward and again
    backward. Here the scaling (the dropout's rescale folded in) rides on the B matmul's alpha and the add is
    that matmul's beta, so the only full-size tensors are the output and, with dropout, one masked copy of the
    input. It also saves less for backward: the input itself (which q/k/v or gate/up share) and its keep bits,
    not one dropped-out copy per adapter; backward masks the input again. The base's gradient path dequantizes W
    again, as bitsandbytes' own matmul does, and skips it when the input needs no gradient."""

    @staticmethod
    def forward(
        ctx: object,
        x: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        base: torch.nn.Module,
        scale: float,
        p: float,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        weight = _dequantized(base, x.dtype)
        bias = base.bias
        y = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias.to(x.dtype), x2, weight.t())
        del weight
        keep = None
        if p > 0:
            keep, rescale = keep_bits(x2.shape, p, x2.dtype, x2.device)
            scale = scale * rescale
            xd = masked(x2, keep)
        else:
            xd = x2
        h = torch.mm(xd, a.to(x.dtype).t())
        del xd
        y.addmm_(h, b.to(x.dtype).t(), alpha=scale)
        ctx.save_for_backward(x2, h, keep, a, b)
        ctx.base, ctx.scale, ctx.shape = base, scale, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple:
        x2, h, keep, a, b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        a_c, b_c = a.to(g.dtype), b.to(g.dtype)
        gh = torch.mm(g, b_c).mul_(ctx.scale)  # [tokens, r]: small
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[2]:
            grad_b = torch.mm(g.t(), h).mul_(ctx.scale).to(b.dtype)
        if ctx.needs_input_grad[1]:
            xd = x2 if keep is None else masked(x2, keep)
            grad_a = torch.mm(gh.t(), xd).to(a.dtype)
            del xd  # before grad_x: one input-sized temporary at a time
        if ctx.needs_input_grad[0]:
            weight = _dequantized(ctx.base, g.dtype)
            # The adapter's part first, masked, then the base's added into it in place: one input-sized tensor.
            if keep is None:
                grad_x = torch.mm(g, weight).addmm_(gh, a_c)
            else:
                grad_x = mask_(torch.mm(gh, a_c), keep).addmm_(g, weight)
            grad_x = grad_x.view(ctx.shape)
        return grad_x, grad_a, grad_b, None, None, None


def _dequantized(base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    import bitsandbytes.functional as bnb_functional

    weight = base.weight
    return bnb_functional.dequantize_4bit(weight.data, weight.quant_state).to(dtype)


def _fusable_call(layer: torch.nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
    """The one adapter a call may run through _LoraOn4bit, or None where peft's own forward must run: not on
    a CPU, adapters off or merged, several adapters or a variant (DoRA), mixed-batch adapter names, autocast to
    another dtype, a base whose compute dtype or CPU inference packing differs from what _dequantized assumes,
    a trainable bias."""
    if args or kwargs or layer.disable_adapters or layer.merged or x.device.type != "cpu":
        return None
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") != x.dtype:
        return None
    active = layer.active_adapters
    if len(active) != 1 or active[0] not in layer.lora_A or active[0] in getattr(layer, "lora_variant", {}):
        return None
    base = layer.get_base_layer()
    state = getattr(base.weight, "quant_state", None)
    if (
        state is None
        or getattr(state, "packing_format_for_cpu", False)
        or x.dtype not in (torch.float32, torch.bfloat16)
        or getattr(base, "compute_dtype", None) not in (None, x.dtype)
        or (base.bias is not None and base.bias.requires_grad)
        or layer.lora_A[active[0]].bias is not None
        or layer.lora_B[active[0]].bias is not None
    ):
        return None
    return active[0]


def _on_4bit(layer: torch.nn.Module) -> bool:
    import bitsandbytes as bnb

    return isinstance(layer.get_base_layer(), bnb.nn.Linear4bit)


_FUSED: dict[type, type] = {}


def _fused_class(cls: type) -> type:
    """A subclass of peft's LoRA layer whose forward takes _LoraOn4bit when it can: same parameters, same
    state dict, peft's own forward for everything else."""
    if cls in _FUSED.values():
        return cls
    if cls not in _FUSED:
        _FUSED[cls] = type(cls.__name__, (cls,), {"forward": _fused_forward, "_peft_forward": cls.forward})
    return _FUSED[cls]


def _fused_forward(self: torch.nn.Module, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    name = _fusable_call(self, x, args, kwargs)
    if name is None:
        return self._peft_forward(x, *args, **kwargs)
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    return _LoraOn4bit.apply(
        x, self.lora_A[name].weight, self.lora_B[name].weight, self.get_base_layer(), self.scaling[name], p
    )
