"""The memory planner: exact parameter parts, predicted vs measured peaks, `qalign plan`, and `auto` settings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import add_dpo, write_recipe
from test_cli_sft import metrics, qalign

from qalign import memory, memory_auto, model_shapes
from qalign.errors import UserError
from qalign.model import attach_lora, cpu_has_native_bf16, footprint_bytes, load_base
from qalign.recipe import LoraSpec, ModelSpec
from qalign.recipe_load import load_recipe

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import plan_accuracy


def planned(recipe, stage: str = "sft", target: str = "cpu", limit: int | None = None) -> memory.Plan:
    config, source = model_shapes.load_config(recipe.model)
    arch = model_shapes.describe(config, recipe.model, source)
    return memory.estimate(arch, recipe, stage, memory.Lengths(longest=32, longest_trained=20), target, limit)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma2", "phi3", "gpt2"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_parameter_parts_equal_the_real_tensors(tiny_model, tmp_path, arch, double_quant):
    path = write_recipe(tmp_path, tiny_model(arch))
    recipe = load_recipe(path, [f"model.double_quant={str(double_quant).lower()}"])
    plan = planned(recipe)
    base = load_base(ModelSpec(base=str(tiny_model(arch)), double_quant=double_quant), torch.device("cpu"))
    assert plan.components["base_weights"] == footprint_bytes(base)
    model = attach_lora(base, LoraSpec(r=8), gradient_checkpointing=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert plan.components["lora_weights"] == sum(p.numel() * p.element_size() for p in trainable)
    assert plan.components["lora_gradients"] == plan.components["lora_weights"]
    # AdamW: two fp32 moments per value and an fp32 step counter per tensor.
    assert plan.components["optimizer_states"] == 2 * plan.components["lora_weights"] + 4 * len(trainable)


def test_quantized_storage_of_one_layer_by_hand():
    # 64 x 128 weights: 4096 bytes packed, 128 blocks of 64.
    assert model_shapes.quantized_bytes(64 * 128, double_quant=False) == (4096, 128 * 4 + 64)
    # Double quant: uint8 absmax (128) + fp32 offset (4) + one fp32 absmax per 256 blocks (4) + both codes.
    assert model_shapes.quantized_bytes(64 * 128, double_quant=True) == (4096, 128 + 4 + 4 + 64 + 1024)


@pytest.mark.parametrize(
    "case", plan_accuracy.FAST_CASES, ids=lambda c: f"{c.name}-{c.stage}-{c.dtype}-ckpt{c.checkpointing}"
)
def test_predicted_peak_is_within_15_percent_of_the_measured_one(tmp_path, case):
    if case.dtype == "bf16" and not cpu_has_native_bf16():
        pytest.skip("bf16 is emulated on this CPU (and not what compute_dtype: auto picks here)")
    model = plan_accuracy.build_model(case, tmp_path / "model")
    recipe = plan_accuracy.recipe_for(case, model, tmp_path / "run")
    predicted, measured = plan_accuracy.predict(case, recipe), plan_accuracy.measure(case, recipe)
    assert abs(predicted - measured) / measured < 0.15, (predicted, measured)


def test_dpo_plans_one_row_per_pair_unless_the_attention_cannot_take_it(tiny_model, tmp_path):
    from qalign.dpo import DpoExample

    # A 10-token prompt, then 6 chosen and 4 rejected tokens: one row of 20, 6 + 4 trained positions.
    prompt = list(range(3, 13))
    chosen, rejected = prompt + [20] * 6, prompt + [30] * 4
    example = DpoExample(chosen, [-100] * 10 + [20] * 6, rejected, [-100] * 10 + [30] * 4, "x", prompt)
    lengths = memory.lengths_of([example], "dpo")
    assert (lengths.longest, lengths.longest_trained) == (16, 6)
    assert (lengths.longest_pair, lengths.longest_pair_trained) == (20, 10)

    # Padded pair rows (packing lays them end to end instead: tests/test_packing.py).
    recipe = load_recipe(add_dpo(write_recipe(tmp_path, tiny_model("llama")), batch_size=2, packing=False))
    config, source = model_shapes.load_config(recipe.model)
    arch = model_shapes.describe(config, recipe.model, source)
    plan = memory.estimate(arch, recipe, "dpo", lengths, "cpu")
    assert (plan.rows, plan.seq_len, plan.trained_positions) == (2, 20, 2 * 10)
    recipe.model.attn_implementation = "flash_attention_2"
    plan = memory.estimate(arch, recipe, "dpo", lengths, "cpu")
    assert (plan.rows, plan.seq_len, plan.trained_positions) == (4, 16, 4 * 6)


def test_checkpointing_and_dpo_change_the_plan_as_they_should(tiny_model, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, tiny_model("llama")))
    plan = planned(recipe)
    assert plan.activations_by_checkpointing["on"] < plan.activations_by_checkpointing["off"]
    assert "cuda_context" not in plan.components
    gpu = planned(recipe, target="cuda", limit=8 * memory.GiB)
    assert gpu.components["cuda_context"] == memory.CUDA_CONTEXT and gpu.fits is True


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8GiB", 8 * 2**30),
        ("8GB", 8 * 2**30),
        ("8000MiB", 8000 * 2**20),
        ("123456", 123456),
        ("1.5g", 3 * 2**29),
    ],
)
def test_memory_sizes(text, expected):
    assert memory_auto.parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "8 GiBs", "-1GB", "0"])
def test_bad_memory_sizes_are_user_errors(text):
    with pytest.raises(UserError, match="--gpu-memory"):
        memory_auto.parse_size(text)


def test_builtin_table_covers_the_shipped_recipes():
    from qalign.architectures import known_config

    for path in sorted(Path(__file__).resolve().parents[1].glob("recipes/*.yaml")):
        base = yaml.safe_load(path.read_text())["model"]["base"]
        if "/" in base and not base.startswith("."):
            assert known_config(base) is not None, base


def test_plan_json_on_a_tiny_model(tiny_model, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model("llama"))
    done = qalign("plan", str(recipe), "--json", "--gpu-memory", "1GiB", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)  # the whole of stdout is one object
    assert isinstance(result["total_bytes"], int) and result["fits"] is True
    assert result["total_bytes"] == sum(result["components"].values())
    assert {"base_weights", "lora_weights", "activations", "logits", "cuda_context"} <= set(
        result["components"]
    )
    assert result["suggestions"] == []
    # Packed (auto, on here): the 4 longest examples end to end, not 4 x max_length (64).
    assert 0 < result["sequence_length"] < 4 * 64 and "packed" in " ".join(result["assumptions"])

    needed = result["total_bytes"]
    assert result["activation_offloading"] is False and result["host_offload_bytes"] == 0
    tight = qalign("plan", str(recipe), "--json", "--gpu-memory", str(needed - 1), cwd=tmp_path)
    result = json.loads(tight.stdout)
    # activation_offloading: auto turns on where the plan would not fit without it.
    assert result["activation_offloading"] is True and result["fits"] is True
    assert result["host_offload_bytes"] > 0 and result["total_bytes"] < needed
    tight = qalign(
        "plan",
        str(recipe),
        "--json",
        "--gpu-memory",
        str(needed - 1),
        "--set",
        "sft.activation_offloading=false",
        cwd=tmp_path,
    )
    result = json.loads(tight.stdout)
    assert result["fits"] is False
    assert result["suggestions"] and all("=" in s and not s.startswith("--") for s in result["suggestions"])

    # Without --gpu-memory the plan checks against what this machine has free, as a run's `auto` does.
    free = qalign("plan", str(recipe), "--json", cwd=tmp_path)
    assert json.loads(free.stdout)["fits"] is True


def test_plan_rejects_a_bad_memory_size(tiny_model, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model("llama"))
    done = qalign("plan", str(recipe), "--gpu-memory", "plenty", cwd=tmp_path)
    assert done.returncode == 2
    assert "--gpu-memory plenty" in done.stderr and "Traceback" not in done.stderr


def test_a_run_records_its_plan_and_measured_peak_and_auto_resolves_once(tiny_model, tmp_path):
    recipe = write_recipe(
        tmp_path,
        tiny_model("llama"),
        max_steps=2,
        eval_every=0,
        gradient_checkpointing="auto",
        batch_size="auto",
    )
    done = qalign("sft", str(recipe), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "plan:" in done.stdout and "measured peak:" in done.stdout
    run = tmp_path / "runs" / "tiny"
    final = metrics(run)[-1]
    assert final["final"] is True and final["plan_total_bytes"] > 0
    assert final["peak_memory_bytes"] > 0 and final["peak_memory_kind"] == "cpu_peak_rss"
    saved = yaml.safe_load((run / "sft" / "recipe.yaml").read_text())["sft"]
    # A tiny model fits anywhere: no checkpointing, the CPU cap of 8.
    assert (saved["gradient_checkpointing"], saved["batch_size"]) == (False, 8)
    # `qalign plan` without --gpu-memory decides `auto` by the same rule as the run, on the same machine.
    planned = json.loads(qalign("plan", str(recipe), "--json", cwd=tmp_path).stdout)
    assert (planned["gradient_checkpointing"], planned["batch_size"]) == (False, 8)
    # Running again resumes (here: finds the run complete) with the values the checkpoint was trained with.
    again = qalign("sft", str(recipe), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "already complete" in again.stdout


def test_auto_takes_the_checkpointed_values_over_a_fresh_decision(tiny_model, tmp_path):
    path = write_recipe(tmp_path, tiny_model("llama"), gradient_checkpointing="auto", batch_size="auto")
    config, source = model_shapes.load_config(load_recipe(path).model)
    lengths = memory.Lengths(longest=32, longest_trained=20)

    def resolved(limit: int, earlier: dict | None = None) -> tuple:
        recipe = load_recipe(path)
        arch = model_shapes.describe(config, recipe.model, source)
        settings, _ = memory_auto.resolve_auto(arch, recipe, "sft", lengths, "cpu", limit, earlier)
        assert recipe.sft.batch_size == "auto"  # the validated recipe is never edited
        return settings["gradient_checkpointing"], settings["batch_size"]

    assert resolved(2**40) == (False, 8)
    recipe = load_recipe(path)
    arch = model_shapes.describe(config, recipe.model, source)
    without = memory.estimate(arch, recipe, "sft", lengths, "cpu", batch_size=1, gradient_checkpointing=False)
    small = resolved(without.total_bytes - 1)
    assert small[0] is True and small[1] < 8
    assert resolved(without.total_bytes - 1, {"gradient_checkpointing": False, "batch_size": 8}) == (False, 8)


def test_offline_plan_of_a_table_id_never_asks_the_network(tmp_path):
    import os
    import subprocess

    from test_cli_sft import QALIGN

    # No offline switch and an empty hub cache: the config comes from the built-in table and the tokenizer is
    # not looked for online, so the plan answers at once instead of waiting out the hub client's retries.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env["HF_HOME"] = str(tmp_path / "hf")
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "qwen2.5-0.5b-sft-dpo.yaml"
    done = subprocess.run(
        [*QALIGN, "plan", str(recipe), "--stage", "dpo", "--gpu-memory", "8GiB", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=40,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assumptions = " ".join(result["assumptions"])
    assert "built-in table entry for Qwen/Qwen2.5-0.5B-Instruct" in assumptions
    assert "tokenizer of Qwen/Qwen2.5-0.5B-Instruct is not on disk" in assumptions
    # The recipe's max_length, as the note says: one row per pair (auto keeps DPO's pairs padded) of 2 x 1024.
    assert result["sequence_length"] == 2048 and "one row per pair" in assumptions


def test_the_loss_head_is_one_chunk_of_logits_whatever_the_vocabulary():
    # Llama 3.1 8B from the built-in table, SFT at batch 1 x 2048: 2047 trained positions, each with a bf16
    # hidden state and its unit gradient (2 x 4096 x 2 bytes), an fp32 log-prob and an int64 target; and one
    # chunk of 128 tokens x 128,256 logits, two fp32 buffers of them at once.
    root = Path(__file__).resolve().parents[1]
    overrides = ["sft.batch_size=1", "sft.max_length=2048"]
    recipe = load_recipe(root / "recipes" / "llama-3.1-8b-instruct-24gb.yaml", overrides)
    config, source = model_shapes.load_config(recipe.model)
    arch = model_shapes.describe(config, recipe.model, source)
    plan = memory.estimate(arch, recipe, "sft", memory.Lengths(), "cuda", 24 * memory.GiB)
    assert plan.components["logits"] == 2047 * (2 * 4096 * 2 + 4 + 8) + 128 * 128_256 * 8
    assert plan.components["logits"] < 0.3 * memory.GiB
    # A vocabulary twice as big gets chunks half as long: the logits part stays the same size.
    arch.vocab = 256_512
    bigger = memory.estimate(arch, recipe, "sft", memory.Lengths(), "cuda", 24 * memory.GiB)
    assert bigger.components["logits"] == 2047 * (2 * 4096 * 2 + 4 + 8) + 64 * 256_512 * 8


def test_plan_per_process_for_both_strategies(tmp_path):
    """`qalign plan --nproc 4` on Llama-3.1-8B's config: ddp holds everything on each process plus DDP's bucket
    copy of the adapter's gradients; fsdp splits the decoder layers' weights and the adapter four ways and adds
    two gathered layers, keeping the embedding and LM head whole."""
    recipe = Path(__file__).parent.parent / "recipes" / "llama-3.1-8b-instruct-24gb.yaml"
    args = ("plan", str(recipe), "--stage", "sft", "--gpu-memory", "24GiB", "--json")
    one = json.loads(qalign(*args, "--nproc", "1", cwd=tmp_path).stdout)
    four = json.loads(qalign(*args, "--nproc", "4", cwd=tmp_path).stdout)
    assert "per_process_total_bytes" not in one
    per = four["per_process_total_bytes"]
    c = one["components"]
    assert per["ddp"] == one["total_bytes"] + c["lora_gradients"] == four["total_bytes"]
    detail = one["base_weights_detail"]
    whole = detail["embeddings"] + detail["lm_head"] + detail["buffers"]
    layers = 32
    layer = (c["base_weights"] - whole + c["lora_weights"]) / layers
    shared = -(-(c["base_weights"] - whole) // 4) + sum(
        -(-c[k] // 4) for k in ("lora_weights", "lora_gradients", "optimizer_states")
    )
    rest = (
        one["total_bytes"]
        - c["base_weights"]
        - c["lora_weights"]
        - c["lora_gradients"]
        - c["optimizer_states"]
    )
    expected = whole + shared + int(2 * layer) + int(2 * c["lora_gradients"] / layers) + rest
    assert per["fsdp"] == expected
    assert per["fsdp"] < one["total_bytes"] - 2 * 2**30  # the 8B base's 4-bit layers, 4 ways: GiBs saved
    done = qalign(
        "plan", str(recipe), "--stage", "sft", "--gpu-memory", "24GiB", "--nproc", "4", cwd=tmp_path
    )
    assert (
        f"each of 4 processes: ddp {per['ddp'] / 2**30:.2f} GiB, fsdp {per['fsdp'] / 2**30:.2f} GiB"
        in done.stdout
    )
