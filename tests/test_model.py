"""4-bit loading, LoRA attachment, parameter accounting and trained-token log-probs, on real bitsandbytes
quantization of tiny random-weight models of every supported architecture (nothing is mocked)."""

from __future__ import annotations

import math

import bitsandbytes as bnb
import pytest
import torch
from conftest import ARCHS
from peft.tuners.lora import LoraLayer
from transformers.pytorch_utils import Conv1D

from qalign.logprobs import label_logprobs
from qalign.model import attach_lora, count_parameters, footprint_bytes, linear_module_names, load_base
from qalign.recipe import LoraSpec, ModelSpec

CPU = torch.device("cpu")
LLAMA_LIKE = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
EXPECTED_LINEAR = {
    "llama": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "gemma2": LLAMA_LIKE,
    "phi3": ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"],
    "gpt2": ["c_attn", "c_fc", "c_proj"],
}
ALL_ARCHS = list(EXPECTED_LINEAR)
LORA = LoraSpec(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
SEQ = 16


def load(tiny_model, arch: str, quantization: str = "nf4", double_quant: bool = True) -> torch.nn.Module:
    # fp32 whatever this CPU's `auto` is: these tests compare against exact byte counts and fp32 references.
    spec = ModelSpec(
        base=str(tiny_model(arch)),
        quantization=quantization,
        double_quant=double_quant,
        compute_dtype="fp32",
    )
    return load_base(spec, CPU)


def lora_model(tiny_model, arch: str, gradient_checkpointing: bool = False) -> torch.nn.Module:
    """A fresh nf4 base with LoRA whose A and B are set from a fixed generator: B non-zero, so the adapter
    changes the output, and two calls give bit-identical models."""
    model = attach_lora(load(tiny_model, arch), LORA, gradient_checkpointing)
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


def padded_batch(pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows: row 0 all 16 tokens real, row 1 11 real then 5 of right padding. Labels: the first 4
    (row 0) / 3 (row 1) positions are prompt (-100), row 1 also has a hole at position 7, padding is -100.
    Trained targets (labels[:, 1:]): row 0 positions 4..15 -> 12 tokens; row 1 positions 3..10 minus 7 ->
    7 tokens. Returns (ids, mask, labels, expected rows)."""
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(10, 1000, (2, SEQ), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    ids[1, 11:] = pad_id
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[0, :4] = -100
    labels[1, :3] = -100
    labels[1, 7] = -100
    rows = torch.tensor([0] * 12 + [1] * 7)
    return ids, mask, labels, rows


def reference_logprobs(model, ids, mask, labels) -> torch.Tensor:
    """The straightforward way: full logits from the model's own forward, log-softmax, gather, shift."""
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logps = torch.log_softmax(logits, dim=-1)[:, :-1]
    targets = labels[:, 1:]
    picked = logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked[targets != -100]


def batch_for(model):
    return padded_batch(model.config.pad_token_id or 0)


def lora_grads(model) -> dict[str, torch.Tensor]:
    model.train()
    ids, mask, labels, _ = batch_for(model)
    model.zero_grad(set_to_none=True)
    logps, _ = label_logprobs(model, ids, mask, labels)
    (-logps.mean()).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def linear4bit_modules(model) -> dict[str, bnb.nn.Linear4bit]:
    return {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


# -- the tiny models -------------------------------------------------------------------------------------------


def test_every_arch_has_expectations():
    assert sorted(ARCHS) == sorted(EXPECTED_LINEAR)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_tiny_model_builds(tiny_model, arch):
    folder = tiny_model(arch)
    assert (folder / "config.json").is_file()
    assert (folder / "model.safetensors").is_file()


# -- loading ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_nf4_double_quant_gives_linear4bit(tiny_model, arch):
    model = load(tiny_model, arch, "nf4", double_quant=True)
    layers = linear4bit_modules(model)
    assert layers, "no bitsandbytes Linear4bit layer after a 4-bit load"
    assert {name.rsplit(".", 1)[-1] for name in layers} == set(EXPECTED_LINEAR[arch])
    for layer in layers.values():
        assert layer.weight.dtype == torch.uint8
        state = layer.weight.quant_state
        assert state.quant_type == "nf4"
        assert state.nested is True
        assert state.state2 is not None
    # The LM head stays unquantized, and nothing is trainable before LoRA.
    assert not isinstance(model.get_output_embeddings(), bnb.nn.Linear4bit)
    assert not any(p.requires_grad for p in model.parameters())
    assert model.config.use_cache is False


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fp4_without_double_quant(tiny_model, arch):
    layers = linear4bit_modules(load(tiny_model, arch, "fp4", double_quant=False))
    assert layers
    for layer in layers.values():
        state = layer.weight.quant_state
        assert state.quant_type == "fp4"
        assert state.nested is False
        assert state.state2 is None
        assert state.absmax.dtype == torch.float32


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_quantization_none_gives_plain_layers(tiny_model, arch):
    model = load(tiny_model, arch, "none")
    assert not linear4bit_modules(model)
    # GPT-2 keeps its transformers Conv1D (a transposed linear); every other arch has nn.Linear.
    kind = Conv1D if arch == "gpt2" else torch.nn.Linear
    found = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, kind) and module is not model.get_output_embeddings()
    }
    assert found == set(EXPECTED_LINEAR[arch])
    assert all(p.dtype == torch.float32 for p in model.parameters())


# -- all-linear -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_linear_module_names_4bit(tiny_model, arch):
    model = load(tiny_model, arch)
    names = linear_module_names(model)
    assert names == EXPECTED_LINEAR[arch]
    assert "lm_head" not in names


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_linear_module_names_unquantized(tiny_model, arch):
    model = load(tiny_model, arch, "none")
    assert linear_module_names(model) == EXPECTED_LINEAR[arch]


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_attach_lora_targets_exactly_the_linear_layers(tiny_model, arch):
    base = load(tiny_model, arch)
    quantized = set(linear4bit_modules(base))
    model = attach_lora(base, LORA, gradient_checkpointing=False)
    with_lora = {name for name, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)}
    assert with_lora == quantized
    assert {name.rsplit(".", 1)[-1] for name in with_lora} == set(EXPECTED_LINEAR[arch])
    head = model.get_base_model().get_output_embeddings()
    assert not isinstance(head, LoraLayer)

    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert all(".lora_A." in name or ".lora_B." in name for name in trainable)
    # Every LoRA parameter is trainable, and there are r * (in + out) of them per layer.
    lora_params = {name for name, _ in model.named_parameters() if "lora_" in name}
    assert lora_params == set(trainable)
    expected = sum(
        LORA.r * (m.in_features + m.out_features) for m in linear4bit_modules(model.get_base_model()).values()
    )
    n_trainable, n_total = count_parameters(model)
    assert n_trainable == expected == sum(p.numel() for p in trainable.values())
    _, n_base = count_parameters(load(tiny_model, arch))
    assert n_total == n_base + n_trainable


# -- parameter accounting ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_count_parameters_matches_unquantized(tiny_model, arch):
    plain = load(tiny_model, arch, "none")
    assert count_parameters(load(tiny_model, arch)) == (0, sum(p.numel() for p in plain.parameters()))
    assert count_parameters(plain) == (0, sum(p.numel() for p in plain.parameters()))


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_footprint_smaller_in_4bit(tiny_model, arch):
    plain = load(tiny_model, arch, "none")
    unique = {id(t): t for t in [*plain.parameters(), *plain.buffers()]}.values()
    assert footprint_bytes(plain) == sum(t.numel() * t.element_size() for t in unique)
    assert footprint_bytes(load(tiny_model, arch)) < footprint_bytes(plain)


def test_footprint_hand_computed_llama(tiny_model):
    """Tiny llama, nf4 with double quant, blocksize 64: every 4-bit weight of n values is n/2 packed bytes,
    n/64 uint8 absmax, the 16-entry fp32 nf4 code, a 0-d fp32 offset, and a nested state of
    ceil(n/64/256) fp32 absmax plus a 256-entry fp32 code. Everything else (embeddings, norms, LM head,
    rotary buffers) is fp32 at 4 bytes per value."""
    model = load(tiny_model, "llama")
    quantized_bytes = 0
    quantized_params = set()
    for layer in linear4bit_modules(model).values():
        weight, state = layer.weight, layer.weight.quant_state
        n = layer.in_features * layer.out_features
        assert weight.numel() == n // 2 and weight.element_size() == 1
        assert state.blocksize == 64 and state.absmax.dtype == torch.uint8
        assert state.absmax.numel() == n // 64 and state.code.numel() == 16
        assert state.offset.numel() == 1 and state.offset.dtype == torch.float32
        assert state.state2.absmax.numel() == math.ceil(n / 64 / 256)
        assert state.state2.code.numel() == 256
        quantized_bytes += (
            n // 2 + n // 64 + 16 * 4 + 4 + 4 * math.ceil(n / 64 / 256) + 256 * 4
        )  # packed, absmax, code, offset, state2.absmax, state2.code
        quantized_params.add(id(weight))
        if layer.bias is not None:
            quantized_bytes += layer.bias.numel() * layer.bias.element_size()
            quantized_params.add(id(layer.bias))
    # 2 layers x (q 64x64 + k 64x32 + v 64x32 + o 64x64 + gate 64x128 + up 64x128 + down 128x64) values.
    assert sum(m.in_features * m.out_features for m in linear4bit_modules(model).values()) == 2 * 36864
    rest = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in quantized_params}
    assert all(t.dtype == torch.float32 for t in rest.values())
    rest_bytes = sum(4 * t.numel() for t in rest.values())
    assert footprint_bytes(model) == quantized_bytes + rest_bytes


# -- log-probs of the trained tokens ----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_label_logprobs_match_full_forward(tiny_model, arch):
    model = lora_model(tiny_model, arch)
    model.eval()
    ids, mask, labels, rows = batch_for(model)
    with torch.no_grad():
        logps, got_rows = label_logprobs(model, ids, mask, labels)
        expected = reference_logprobs(model, ids, mask, labels)
        with model.disable_adapter():
            without_lora, _ = label_logprobs(model, ids, mask, labels)
    assert logps.dtype == torch.float32
    assert logps.shape == (19,)
    assert torch.equal(got_rows, rows)
    torch.testing.assert_close(logps, expected, atol=1e-5, rtol=0)
    assert (logps <= 0).all()
    # The perturbed adapter really is part of the computation.
    assert (logps - without_lora).abs().max() > 1e-3


def test_gemma2_logit_softcapping(tiny_model):
    """Gemma 2 soft-caps its logits inside its own forward, which label_logprobs bypasses; with the default
    cap (30) the tiny model's logits are too small for capping to show, so lower it until it dominates."""
    model = lora_model(tiny_model, "gemma2")
    assert model.config.final_logit_softcapping
    model.eval()
    ids, mask, labels, _ = batch_for(model)
    with torch.no_grad():
        model.config.final_logit_softcapping = None
        uncapped = reference_logprobs(model, ids, mask, labels)
        model.config.final_logit_softcapping = 0.5
        capped = reference_logprobs(model, ids, mask, labels)
        logps, _ = label_logprobs(model, ids, mask, labels)
    assert (capped - uncapped).abs().max() > 1e-2  # the cap matters at 0.5
    torch.testing.assert_close(logps, capped, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_gradients_reach_every_lora_parameter(tiny_model, arch):
    model = lora_model(tiny_model, arch)
    grads = lora_grads(model)
    lora = [name for name, _ in model.named_parameters() if ".lora_A." in name or ".lora_B." in name]
    assert sorted(grads) == sorted(lora)
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        assert grad.abs().max() > 0, name
    for name, param in model.named_parameters():
        if "lora_" not in name:
            assert param.grad is None, name


# -- the bitsandbytes CPU inference repacking -----------------------------------------------------------


def _eval_pass(model) -> torch.Tensor:
    model.eval()
    ids, mask, labels, _ = batch_for(model)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        logps, _ = label_logprobs(model, ids, mask, labels)
    return logps


def test_eval_pass_does_not_change_training(tiny_model):
    """bitsandbytes repacks a Linear4bit for its bf16 CPU inference kernel (no autograd) the first time it
    runs in eval mode without grad on a CPU with avx512bf16; a model from load_base must not, so an eval
    (or reference) pass leaves training exactly as on a model that never ran eval."""
    fresh = lora_model(tiny_model, "llama")
    fresh_grads = lora_grads(fresh)
    fresh.eval()
    ids, mask, labels, _ = batch_for(fresh)
    with torch.no_grad():
        train_layout_logps, _ = label_logprobs(fresh, ids, mask, labels)

    model = lora_model(tiny_model, "llama")
    eval_logps = _eval_pass(model)
    for name, layer in linear4bit_modules(model).items():
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False), name
    # The eval pass itself ran in the fp32 training layout...
    torch.testing.assert_close(eval_logps, train_layout_logps, atol=1e-6, rtol=0)
    # ...and training afterwards is unchanged.
    grads = lora_grads(model)
    assert grads.keys() == fresh_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, fresh_grads[name], atol=1e-6, rtol=0, msg=name)


@pytest.mark.filterwarnings("ignore:bitsandbytes.*an autograd kernel was not registered:UserWarning")
@pytest.mark.skipif(
    not bnb.functional.has_avx512bf16(), reason="bitsandbytes repacks only on CPUs with avx512bf16"
)
def test_eval_repacking_control(tiny_model):
    """The control for the test above: with bitsandbytes' own default (repack when the CPU allows it), the
    eval pass does repack, and training afterwards differs, so the test above can fail."""
    fresh_grads = lora_grads(lora_model(tiny_model, "llama"))
    model = lora_model(tiny_model, "llama")
    for layer in linear4bit_modules(model).values():
        layer.support_avx512bf16_for_cpu = True
    _eval_pass(model)
    assert all(
        getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
        for layer in linear4bit_modules(model).values()
    )
    grads = lora_grads(model)
    assert any(not torch.allclose(grads[n], fresh_grads[n], atol=1e-6, rtol=0) for n in grads)


# -- gradient checkpointing -----------------------------------------------------------------------------


def test_gradient_checkpointing_changes_nothing(tiny_model):
    def loss_and_grads(checkpointing: bool):
        model = lora_model(tiny_model, "llama", gradient_checkpointing=checkpointing)
        model.train()
        assert model.get_base_model().is_gradient_checkpointing is checkpointing
        ids, mask, labels, _ = batch_for(model)
        logps, _ = label_logprobs(model, ids, mask, labels)
        loss = -logps.mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), grads

    loss_off, grads_off = loss_and_grads(False)
    loss_on, grads_on = loss_and_grads(True)
    torch.testing.assert_close(loss_on, loss_off, atol=1e-5, rtol=0)
    assert grads_on.keys() == grads_off.keys()
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], atol=1e-5, rtol=0, msg=name)
