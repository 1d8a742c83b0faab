import pytest
import torch
from conftest import saved_storage_bytes

from qalign.model import load_base
from qalign.recipe import ModelSpec
from qalign.rmsnorm import fuse_rms_norms

CPU = torch.device("cpu")


def _norms(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]


def _base(tiny_model, arch: str, dtype: str) -> torch.nn.Module:
    model = load_base(ModelSpec(base=str(tiny_model(arch)), compute_dtype=dtype), CPU)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # weights away from 1, so that multiplying by them is exercised
        for norm in _norms(model):
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=generator) + 0.5)
            norm.weight.requires_grad_(False)  # frozen, as LoRA leaves it
    return model


def _forward_backward(norm: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple:
    x = x.clone().requires_grad_(True)
    with saved_storage_bytes() as saved:
        y = norm(x)
    y.backward(grad)
    return y.detach(), x.grad, sum(saved.values())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_node_gives_transformers_output_bit_for_bit_and_its_gradient(tiny_model, arch, dtype):
    model = _base(tiny_model, arch, dtype)
    norms = _norms(model)
    originals = [type(n) for n in norms]
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    assert fuse_rms_norms(model, torch_dtype) == len(norms) > 0
    assert all(type(n) is not cls and isinstance(n, cls) for n, cls in zip(norms, originals, strict=True))
    generator = torch.Generator().manual_seed(2)
    for norm, cls in zip(norms, originals, strict=True):
        width = norm.weight.shape[0]
        x = (torch.randn(3, 7, width, generator=generator) * 4).to(torch_dtype)
        grad = torch.randn(3, 7, width, generator=generator).to(torch_dtype)
        plain = cls.__new__(cls)
        plain.__dict__ = norm.__dict__  # the same module, transformers' forward
        want, want_grad, want_saved = _forward_backward(plain, x, grad)
        got, got_grad, got_saved = _forward_backward(norm, x, grad)
        assert torch.equal(got, want)
        assert got_grad.dtype == want_grad.dtype == torch_dtype
        if dtype == "fp32":
            torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-5)
            assert got_saved <= want_saved
        else:
            # Rounded in another order: within one bf16 step of the largest gradient, close to it everywhere.
            scale = want_grad.float().abs().max()
            assert (got_grad.float() - want_grad.float()).abs().max() <= scale / 128
            cosine = torch.nn.functional.cosine_similarity(
                got_grad.float().flatten(), want_grad.float().flatten(), dim=0
            )
            assert cosine > 0.9999
            # transformers keeps an fp32 copy of the input; the node keeps the bf16 input itself.
            assert got_saved < 0.6 * want_saved, (got_saved, want_saved)


def test_gemma_norms_and_trainable_weights_keep_transformers_forward(tiny_model):
    gemma = _base(tiny_model, "gemma2", "fp32")
    assert _norms(gemma) and fuse_rms_norms(gemma, torch.float32) == 0

    llama = _base(tiny_model, "llama", "fp32")
    fuse_rms_norms(llama, torch.float32)
    norm = _norms(llama)[0]
    norm.weight.requires_grad_(True)
    x = torch.randn(2, 5, norm.weight.shape[0], requires_grad=True)
    norm(x).sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0


def test_a_norm_that_computes_otherwise_is_not_swapped():
    class OddRMSNorm(torch.nn.Module):
        """Llama's shape, but the weight multiplies before the cast back (as Gemma's does)."""

        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.rand(16) + 0.5, requires_grad=False)
            self.variance_epsilon = 1e-6

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return (self.weight.float() * h).to(x.dtype)

    model = torch.nn.Sequential(OddRMSNorm()).to(torch.bfloat16)
    assert fuse_rms_norms(model, torch.bfloat16) == 0
    assert type(model[0]) is OddRMSNorm


def test_a_model_fused_twice_counts_its_norms_once_each(tiny_model):
    model = _base(tiny_model, "llama", "bf16")
    first = fuse_rms_norms(model, torch.bfloat16)
    assert fuse_rms_norms(model, torch.bfloat16) == first == len(_norms(model))
