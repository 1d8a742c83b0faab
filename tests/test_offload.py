"""Activation offloading (qalign/offload.py) and its place in the plan.

No GPU here: the offloader is pointed at CPU tensors (device_type="cpu"), which it then copies to new host
tensors exactly as it copies GPU tensors to pinned ones, so what it catches, what it releases and what the
backward gets back are all checked; only the pinned, non-blocking copy is CUDA's alone."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch

from qalign import memory, memory_auto, model_shapes
from qalign.model import attach_lora, load_base
from qalign.offload import ActivationOffload
from qalign.recipe import LoraSpec, ModelSpec
from qalign.recipe_load import load_recipe
from qalign.sft import sft_step

ROOT = Path(__file__).resolve().parents[1]
LLAMA_8B = ROOT / "recipes" / "llama-3.1-8b-instruct-24gb.yaml"


def test_a_saved_tensor_is_released_and_comes_back_equal():
    weight = torch.nn.Parameter(torch.randn(256, 256))
    x = torch.randn(256, 256)
    alive = weakref.ref(x)
    with ActivationOffload("cpu", min_bytes=0) as offload:
        loss = (x * weight).sum()  # mul saves x for weight's gradient
    expected = x.clone()
    del x
    gc.collect()
    # Only the copy is referenced by the graph: the original is gone, as a GPU tensor's memory would be.
    assert alive() is None
    assert offload.tensors == 1 and offload.bytes == 256 * 256 * 4
    loss.backward()
    assert torch.equal(weight.grad, expected)


def test_without_offloading_the_graph_keeps_the_original():
    weight = torch.nn.Parameter(torch.randn(64, 64))
    x = torch.randn(64, 64)
    alive = weakref.ref(x)
    loss = (x * weight).sum()
    del x
    gc.collect()
    assert alive() is not None  # the test above would fail without the offloader
    loss.backward()


def test_a_tensor_saved_twice_is_copied_once_and_a_new_one_at_a_reused_address_is_not_confused():
    weight = torch.nn.Parameter(torch.ones(128, 128))
    x = torch.full((128, 128), 2.0)
    with ActivationOffload("cpu", min_bytes=0) as offload:
        loss = (x * weight).sum() + (x * weight * 3).sum()
        # Fresh tensors freed in turn: their ids (and memory) are reused, their values differ.
        for value in (5.0, 7.0, 11.0):
            t = torch.full((128, 128), value)
            loss = loss + (t * weight).sum()
            del t
    assert offload.tensors >= 4  # x once, then each t; x * weight * 3 saves the scalar product's input too
    loss.backward()
    assert torch.all(weight.grad == 2.0 + 3 * 2.0 + 5.0 + 7.0 + 11.0)


def test_parameters_and_small_tensors_stay_where_they_are():
    weight = torch.nn.Parameter(torch.randn(64, 64))
    with ActivationOffload("cpu", min_bytes=64 * 64 * 4 + 1) as offload:
        loss = (torch.randn(64, 64, requires_grad=True) @ weight).sum()
    assert offload.tensors == 0
    with ActivationOffload("cuda", min_bytes=0) as offload:  # CPU tensors are not the device's
        loss = (torch.randn(64, 64) * weight).sum()
    assert offload.tensors == 0
    loss.backward()


def _checkpointed_step(folder: Path, offload: ActivationOffload | None) -> tuple[float, dict, torch.Tensor]:
    torch.manual_seed(0)
    base = load_base(ModelSpec(base=str(folder), compute_dtype="fp32"), torch.device("cpu"))
    model = attach_lora(base, LoraSpec(r=8, dropout=0.0), gradient_checkpointing=True)
    model.train()
    ids = torch.randint(5, 900, (2, 48), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    if offload is None:
        loss, _ = sft_step(model, batch, int(batch["labels"][:, 1:].numel()))
    else:
        with offload:
            loss, _ = sft_step(model, batch, int(batch["labels"][:, 1:].numel()))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, ids


def test_a_checkpointed_4bit_step_offloads_every_layer_input_and_trains_the_same_bits(tiny_model, tmp_path):
    folder = tiny_model("llama")
    plain_loss, plain, ids = _checkpointed_step(folder, None)
    # Tensors the size of a layer's input ([2, 48, 64] fp32) and up: what checkpointing keeps per layer.
    layer_input = ids.numel() * 64 * 4
    offload = ActivationOffload("cpu", min_bytes=layer_input)
    loss, grads, _ = _checkpointed_step(folder, offload)
    assert loss == plain_loss
    assert all(torch.equal(grads[name], plain[name]) for name in plain)
    layers = 2
    # Each layer's input, then the final norm's input and the loss head's hidden states: the planner's host
    # share is every layer input but the one on the device at a time.
    assert layers * layer_input <= offload.bytes <= (layers + 2) * layer_input


def _plan(stage: str, offloading: str, limit_gib: float = 24) -> memory.Plan:
    overrides = [
        f"{stage}.batch_size=1",
        f"{stage}.max_length=2048",
        f"{stage}.gradient_checkpointing=true",
        f"{stage}.activation_offloading={offloading}",
    ]
    recipe = load_recipe(LLAMA_8B, overrides)
    config, source = model_shapes.load_config(recipe.model)
    arch = model_shapes.describe(config, recipe.model, source)
    return memory.estimate(arch, recipe, stage, memory.Lengths(), "cuda", int(limit_gib * memory.GiB))


@pytest.mark.parametrize(("stage", "target_gib"), [("sft", 7.2), ("dpo", 8.0)])
def test_llama_8b_fits_its_budget_with_offloading(stage, target_gib):
    """Llama-3.1-8B, r16 all-linear, batch 1 x 2048, checkpointing on, without the CUDA context. Offloading
    moves all but one of the 32 checkpointed layer inputs ([tokens, 4096] bf16 each; DPO's pair row holds
    4,096 tokens) to host memory."""
    off, on = _plan(stage, "false"), _plan(stage, "true")
    tokens = 4096 if stage == "dpo" else 2048
    layer_input = tokens * 4096 * 2
    assert on.host_offload_bytes == 31 * layer_input
    saved = off.components["activations"] - on.components["activations"]
    assert saved == 31 * layer_input
    assert (on.total_bytes - on.components["cuda_context"]) / memory.GiB <= target_gib
    assert on.components["logits"] <= 0.3 * memory.GiB
    assert on.to_json()["activation_offloading"] is True and not off.activation_offloading


def test_auto_offloads_only_where_it_is_needed_to_fit():
    def resolved(limit_gib: float, target: str = "cuda") -> tuple[dict, list[str]]:
        recipe = load_recipe(LLAMA_8B, ["dpo.batch_size=1", "dpo.max_length=2048"])
        config, source = model_shapes.load_config(recipe.model)
        arch = model_shapes.describe(config, recipe.model, source)
        return memory_auto.resolve_auto(arch, recipe, "dpo", memory.Lengths(), target, int(limit_gib * 2**30))

    settings, decided = resolved(10)
    assert settings["activation_offloading"] is True
    assert "dpo.activation_offloading auto -> true" in decided
    assert resolved(24)[0]["activation_offloading"] is False
    settings, decided = resolved(10, "cpu")
    assert settings["activation_offloading"] is False and not any("offloading" in line for line in decided)


def test_a_plan_that_only_offloading_rescues_suggests_it_first():
    recipe = load_recipe(
        LLAMA_8B, ["dpo.batch_size=1", "dpo.max_length=2048", "dpo.activation_offloading=false"]
    )
    config, source = model_shapes.load_config(recipe.model)
    arch = model_shapes.describe(config, recipe.model, source)
    plan = memory.estimate(arch, recipe, "dpo", memory.Lengths(), "cuda", 8 * 2**30)
    assert plan.fits is False
    suggestions, note = memory_auto.suggest(arch, recipe, "dpo", memory.Lengths(), plan)
    assert suggestions == ["dpo.activation_offloading=true"] and "same results" in note
    # Not on a CPU, where it would do nothing.
    cpu = memory.estimate(arch, recipe, "dpo", memory.Lengths(), "cpu", 8 * 2**30)
    assert (
        "dpo.activation_offloading=true"
        not in memory_auto.suggest(arch, recipe, "dpo", memory.Lengths(), cpu)[0]
    )
