"""qalign's LoRA layer tuning (qalign/lora.py): the CPU dropout draws the same distribution as nn.Dropout, and
with a bf16 base the adapters multiply in bf16 while their weights and gradients stay fp32 and saved adapters
keep their keys."""

from __future__ import annotations

import pytest
import torch
from conftest import saved_storage_bytes

from qalign.dropout import UniformDropout
from qalign.logprobs import label_logprobs
from qalign.lora import ComputeDtypeLinear, tune_lora_layers
from qalign.model import attach_lora, compute_dtype, cpu_has_native_bf16, load_base
from qalign.recipe import LoraSpec, ModelSpec

CPU = torch.device("cpu")


def test_uniform_dropout_drops_p_and_rescales_the_rest():
    torch.manual_seed(0)
    x = torch.rand(1000, 1000) + 0.5  # no zeros of its own
    x.requires_grad_(True)
    dropout = UniformDropout(p=0.1).train()
    y = dropout(x)
    dropped = y == 0
    assert dropped.float().mean().item() == pytest.approx(0.1, abs=0.002)  # 1e6 draws: standard error 3e-4
    # Each 64-bit hash feeds four neighbouring elements: every lane must drop at the same rate, and whether one
    # element drops must say nothing about its neighbours (pairs within a word and across words).
    lanes = dropped.reshape(-1, 4).float().mean(0)
    torch.testing.assert_close(lanes, torch.full((4,), 0.1), atol=0.004, rtol=0)
    flat = dropped.flatten().float()
    for gap in (1, 2, 3, 4, 5, 8):
        both = (flat[:-gap] * flat[gap:]).mean().item()
        assert both == pytest.approx(0.01, abs=0.0006), gap
    # A second mask (a new seed) is independent of the first.
    again = dropout(x) == 0
    assert (dropped & again).float().mean().item() == pytest.approx(0.01, abs=0.0006)
    # p is rounded up to a multiple of 2^-15, and the kept values are rescaled by that p.
    scale = 32768 / (32768 - 3277)
    kept = ~dropped
    torch.testing.assert_close(y[kept], x[kept] * scale)
    y.sum().backward()
    # d(sum)/dx is the mask times the scale: 0 where dropped, 1/(1-p) where kept.
    torch.testing.assert_close(x.grad, kept.float() * scale)
    assert dropout.eval()(x) is x
    assert UniformDropout(p=0.0).train()(x) is x


def test_uniform_dropout_replays_the_same_mask_under_gradient_checkpointing():
    from torch.utils.checkpoint import checkpoint

    layer = torch.nn.Linear(32, 32)
    dropout = UniformDropout(p=0.3).train()
    x = torch.randn(8, 32)

    def block(inp: torch.Tensor) -> torch.Tensor:
        return layer(dropout(inp)).relu().sum()

    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(3)
        inp = x.clone().requires_grad_(True)
        out = checkpoint(block, inp, use_reentrant=False) if checkpointed else block(inp)
        out.backward()
        grads.append(inp.grad)
    # The recomputed forward must draw the very mask the first forward drew, or the gradient is wrong.
    torch.testing.assert_close(grads[0], grads[1])


def test_uniform_dropout_is_reproducible_under_a_seed_and_swapped_in_for_nn_dropout(tiny_model):
    x = torch.ones(64, 64)
    masks = []
    for _ in range(2):
        torch.manual_seed(7)
        masks.append(UniformDropout(p=0.3).train()(x))
    assert torch.equal(masks[0], masks[1])
    # An odd element count (not a whole number of 64-bit draws) and a 3-d activation.
    odd = UniformDropout(p=0.5).train()(torch.ones(3, 5, 7))
    assert odd.shape == (3, 5, 7) and 0 < (odd == 0).sum() < odd.numel()

    spec = ModelSpec(base=str(tiny_model("llama")), compute_dtype="fp32")
    model = attach_lora(load_base(spec, CPU), LoraSpec(r=4, alpha=8, dropout=0.1), False)
    tune_lora_layers(model, torch.float32)
    dropouts = [m for name, m in model.named_modules() if name.endswith("lora_dropout.default")]
    assert len(dropouts) == 14  # 7 linear layers x 2 decoder layers
    assert all(type(m) is UniformDropout and m.p == 0.1 for m in dropouts)
    # fp32 compute: the adapters keep peft's own linear layers.
    assert not any(isinstance(m, ComputeDtypeLinear) for m in model.modules())


def test_auto_compute_dtype_on_cpu_follows_native_bf16():
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert compute_dtype("auto", CPU) == expected
    assert compute_dtype("fp32", CPU) == torch.float32


def test_auto_is_fp32_where_torch_runs_its_kernels_at_the_avx2_level(monkeypatch):
    # Even on a CPU with AMX: ATEN_CPU_CAPABILITY=avx2 (the bench's emulated AVX2-only CPU) emulates bf16 ops.
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert compute_dtype("auto", CPU) == torch.bfloat16
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert compute_dtype("auto", CPU) == torch.float32


def _bf16_lora(tiny_model, tuned: bool) -> torch.nn.Module:
    spec = ModelSpec(base=str(tiny_model("llama")), compute_dtype="bf16")
    model = attach_lora(load_base(spec, CPU), LoraSpec(r=4, alpha=8, dropout=0.0), False)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-zero B, so the adapter changes the output
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    if tuned:
        tune_lora_layers(model, torch.bfloat16)
    return model.train()


def _step(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Log-probs, fp32 adapter gradients and the bytes autograd saved for backward."""
    ids = torch.arange(3, 35).view(2, 16)
    labels = ids.clone()
    labels[:, :4] = -100
    with saved_storage_bytes() as saved:
        logps, _ = label_logprobs(model, ids, torch.ones_like(ids), labels)
    (-logps.mean()).backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    return logps.detach(), grads, sum(saved.values())


def test_bf16_adapters_multiply_in_bf16_with_fp32_weights_and_gradients(tiny_model):
    plain, tuned = _bf16_lora(tiny_model, tuned=False), _bf16_lora(tiny_model, tuned=True)
    assert plain.state_dict().keys() == tuned.state_dict().keys()
    assert any(isinstance(m, ComputeDtypeLinear) for m in tuned.modules())
    want, want_grads, want_saved = _step(plain)
    got, got_grads, got_saved = _step(tuned)
    # bf16 has 8 bits of mantissa: the two paths agree to its rounding, not bit for bit.
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.01)
    for name, grad in got_grads.items():
        assert grad.dtype == torch.float32, name
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), want_grads[name].flatten(), dim=0)
        assert cosine > 0.99, name
    # peft's path keeps an fp32 copy of every adapter's input for backward; the tuned one keeps none.
    assert got_saved < 0.8 * want_saved, (got_saved, want_saved)


def _lora(tiny_model, arch: str, dtype: str, dropout: float, tuned: bool) -> torch.nn.Module:
    spec = ModelSpec(base=str(tiny_model(arch)), compute_dtype=dtype)
    model = attach_lora(load_base(spec, CPU), LoraSpec(r=4, alpha=8, dropout=dropout), False)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-zero B, so the adapter changes the output
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    if tuned:
        tune_lora_layers(model, compute_dtype(dtype, CPU))
    return model.train()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: the q/k/v base layers have a bias
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_fused_lora_layer_gives_peft_values_and_gradients_in_fp32(tiny_model, arch, dropout):
    from qalign.lora import _LoraOn4bit

    plain = _lora(tiny_model, arch, "fp32", dropout, tuned=False)
    fused = _lora(tiny_model, arch, "fp32", dropout, tuned=True)
    assert plain.state_dict().keys() == fused.state_dict().keys()
    calls = []
    original = _LoraOn4bit.forward

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    if dropout:
        # The same mask on both paths: peft's dropout made to draw it as the fused layer does.
        for m in plain.modules():
            if type(m) is torch.nn.Dropout:
                m.__class__ = UniformDropout
    torch.manual_seed(11)
    want, want_grads, _ = _step(plain)
    _LoraOn4bit.forward = staticmethod(counting)
    try:
        torch.manual_seed(11)
        got, got_grads, _ = _step(fused)
    finally:
        _LoraOn4bit.forward = staticmethod(original)
    # Every adapted linear of both decoder layers took the fused node. Each adapter draws its own mask, in the
    # same order on both paths: a mask shared between adapters, or drawn in another order, would not match.
    assert len(calls) == 14
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert want_grads.keys() == got_grads.keys()
    for name, grad in got_grads.items():
        torch.testing.assert_close(grad, want_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_fused_lora_layer_replays_its_dropout_mask_under_gradient_checkpointing(tiny_model):
    grads = []
    for checkpointing in (False, True):
        spec = ModelSpec(base=str(tiny_model("llama")), compute_dtype="fp32")
        model = attach_lora(load_base(spec, CPU), LoraSpec(r=4, alpha=8, dropout=0.3), checkpointing)
        tune_lora_layers(model, torch.float32)
        torch.manual_seed(5)
        with torch.no_grad():
            for _, param in sorted(model.named_parameters()):
                if param.requires_grad:
                    param.copy_(torch.randn(param.shape) * 0.05)
        torch.manual_seed(9)
        grads.append(_step(model.train())[1])
    # The recomputed forward must draw the masks the first forward drew, or the adapter's gradients differ.
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)
