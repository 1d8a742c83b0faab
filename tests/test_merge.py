"""qalign merge: the exported model loads with plain transformers and computes what was trained."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import add_dpo, write_recipe
from test_cli_sft import ENV, qalign

PROMPTS = ["<|im_start|>user\nWhat is 2 + 5?<|im_end|>\n<|im_start|>assistant\n", "The answer is 7."]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model):
    """`qalign run` on a recipe with sft, dpo and merge (fp32, so tolerances can be tight)."""
    folder = tmp_path_factory.mktemp("merge")
    recipe = add_dpo(
        write_recipe(folder, tiny_model("llama"), max_steps=4, save_every=0, eval_every=0), max_steps=3
    )
    data = yaml.safe_load(recipe.read_text())
    data["merge"] = {"dtype": "fp32"}
    data["model"]["compute_dtype"] = "fp32"  # whatever this CPU's `auto` is
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    result = qalign("run", str(recipe), cwd=folder)
    assert result.returncode == 0, result.stderr
    return folder, recipe, result


def logits(model, tokenizer) -> list[torch.Tensor]:
    with torch.no_grad():
        return [
            model(**tokenizer(p, return_tensors="pt", add_special_tokens=False)).logits[0] for p in PROMPTS
        ]


def reference_logits(base: Path, adapter: Path, quantized: bool) -> list[torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.float32, quantization_config=quant if quantized else None
    )
    for module in model.modules():
        # Left on, bitsandbytes would switch eval passes to a bf16 CPU kernel: not what training computed.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    model = PeftModel.from_pretrained(model, adapter).eval()
    return logits(model, AutoTokenizer.from_pretrained(adapter))


def test_run_merges_the_dpo_adapter_into_a_plain_model(trained_run, tiny_model):
    folder, _, result = trained_run
    out = folder / "runs" / "tiny" / "merged"
    assert "top-1 agreement" in result.stdout
    names = sorted(p.name for p in out.iterdir())
    weights = [n for n in names if n.endswith((".safetensors", ".bin", ".pt", ".pth"))]
    assert weights and all(n.endswith(".safetensors") for n in weights)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert {"tokenizer.json", "generation_config.json", "merge_report.json"} <= set(names)
    generation = json.loads((out / "generation_config.json").read_text())
    assert set(generation["eos_token_id"]) == {0, 4}  # <|endoftext|> and the template's <|im_end|>
    report = json.loads((out / "merge_report.json").read_text())
    assert report["adapter"].endswith("dpo/adapter") and report["base_weights"] == "nf4-roundtrip"
    assert report["fidelity"]["top1_agreement"] == 1.0 and report["fidelity"]["max_abs_logit_diff"] < 1e-3


def test_merged_model_loads_without_peft_or_bitsandbytes(trained_run):
    folder, _, _ = trained_run
    out = folder / "runs" / "tiny" / "merged"
    script = (
        "import sys, transformers\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        f"t = transformers.AutoTokenizer.from_pretrained({str(out)!r})\n"
        "ids = t.apply_chat_template([{'role': 'user', 'content': 'hi'}], add_generation_prompt=True, return_tensors='pt')\n"
        "m(**ids)\n"
        "assert 'peft' not in sys.modules and 'bitsandbytes' not in sys.modules, 'merged model needed peft/bnb'\n"
        "assert t.chat_template and '<|im_start|>' in t.chat_template\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


@pytest.mark.parametrize("mode", ["nf4-roundtrip", "original"])
def test_each_mode_matches_its_own_reference(trained_run, tiny_model, tmp_path, mode):
    """nf4-roundtrip must compute what was trained (4-bit base + adapter); original must compute the untouched
    16-bit base + adapter. Tolerance: 1e-4 on fp32 logits of order 1."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, recipe, _ = trained_run
    adapter = folder / "runs" / "tiny" / "sft" / "adapter"
    out = tmp_path / "merged"
    result = qalign(
        "merge",
        str(recipe),
        "--stage",
        "sft",
        "--out",
        str(out),
        "--dtype",
        "fp32",
        "--base-weights",
        mode,
        cwd=folder,
    )
    assert result.returncode == 0, result.stderr
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    got = logits(merged, AutoTokenizer.from_pretrained(out))
    expected = reference_logits(tiny_model("llama"), adapter, quantized=mode == "nf4-roundtrip")
    other = reference_logits(tiny_model("llama"), adapter, quantized=mode != "nf4-roundtrip")
    for g, e, o in zip(got, expected, other, strict=True):
        assert (g - e).abs().max().item() < 1e-4
        assert (g - o).abs().max().item() > 1e-3  # the two modes really differ on this base
    # Fidelity is measured against the model as trained (4-bit base + adapter): exact for nf4-roundtrip, and
    # visibly off for original (whether that crosses the POOR FIDELITY line depends on the random base).
    fidelity = json.loads((out / "merge_report.json").read_text())["fidelity"]
    if mode == "original":
        assert fidelity["max_abs_logit_diff"] > 1e-3
        poor = fidelity["top1_agreement"] < 0.98 or fidelity["mean_kl"] > 0.01
        assert ("POOR FIDELITY" in result.stderr) == poor
    else:
        assert fidelity["max_abs_logit_diff"] < 1e-3 and "POOR FIDELITY" not in result.stderr


def test_merge_without_a_recipe_and_refusing_to_clobber(trained_run, tiny_model, tmp_path):
    folder, _, _ = trained_run
    adapter = folder / "runs" / "tiny" / "sft" / "adapter"
    out = tmp_path / "exported"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["merge", "--base", str(tiny_model("llama")), "--adapter", str(adapter), "--out", str(out)]
    refused = qalign(*args, cwd=tmp_path)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    done = qalign(*args, "--overwrite", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (out / "merge_report.json").exists() and not (out / "notes.txt").exists()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_run_again_skips_the_finished_merge(trained_run):
    folder, recipe, _ = trained_run
    again = qalign("run", str(recipe), cwd=folder)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("already complete") == 3


def snapshot(folder: Path) -> dict[str, tuple[bytes, int, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_mode)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_merging_another_stage_over_a_finished_merge_needs_overwrite(trained_run):
    """The run merged dpo into runs/tiny/merged; merging sft there without --overwrite must leave it as it was."""
    folder, recipe, _ = trained_run
    out = folder / "runs" / "tiny" / "merged"
    before = snapshot(out)
    refused = qalign("merge", str(recipe), "--stage", "sft", cwd=folder)
    assert refused.returncode == 2, refused.stderr
    message = refused.stderr.strip()
    assert "\n" not in message and str(out) in message and "--overwrite" in message
    assert snapshot(out) == before
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_merge_overwrite_help_speaks_of_the_output_folder():
    from typer.testing import CliRunner

    from qalign.cli import app

    result = CliRunner().invoke(app, ["merge", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "Replace the output folder" in result.output and "finished adapter" not in result.output


@pytest.mark.parametrize(
    ("quantization", "compute", "dtype", "base_weights", "expect", "never"),
    [
        ("nf4", "fp32", "bf16", "original", "--base-weights nf4-roundtrip", "dtype: fp32"),
        ("nf4", "fp32", "bf16", "nf4-roundtrip", "--dtype fp32", "base_weights"),
        ("nf4", "bf16", "fp32", "nf4-roundtrip", "bf16 compute", "dtype: fp32"),
        ("nf4", "fp32", "fp32", "nf4-roundtrip", "not the base", "dtype: fp32"),
        ("none", "fp32", "fp16", "original", "--dtype fp32", "nf4-roundtrip"),
    ],
)
def test_poor_fidelity_hint_suggests_what_this_merge_did_not_already_do(
    quantization, compute, dtype, base_weights, expect, never
):
    from qalign.adapter import TrainedAs
    from qalign.merge import fidelity_hint

    trained = TrainedAs(base="org/model", quantization=quantization, compute_dtype=compute)
    hint = fidelity_hint(trained, dtype, base_weights)
    assert expect in hint and never not in hint
