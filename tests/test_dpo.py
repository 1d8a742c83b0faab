"""DPO: preference data, the reference pass, step 0, and end-to-end runs of `qalign dpo` / `qalign run`."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TOKENIZER, add_dpo, write_recipe
from test_cli_sft import qalign

from qalign.chat_template import IGNORE
from qalign.data import Row
from qalign.dpo import (
    DpoExample,
    collate_dpo,
    disable_dropout,
    make_dpo_step,
    prepare_dpo,
    reference_logprobs,
    sequence_logprobs,
    split_pair_rows,
    split_preference,
)
from qalign.errors import UserError
from qalign.logprobs import label_logprobs
from qalign.model import attach_lora, load_base
from qalign.progress import Progress
from qalign.recipe import DpoSpec, LoraSpec, ModelSpec
from qalign.reference import compute_reference


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


def row(data: dict) -> Row:
    return Row("pairs.jsonl:7", data)


# -- data ----------------------------------------------------------------------------------------------------


def test_string_pairs():
    prompt, chosen, rejected = split_preference(
        row({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."})
    )
    assert prompt == [{"role": "user", "content": "Hi?"}]
    assert chosen == {"role": "assistant", "content": "Hello."}
    assert rejected["content"] == "Go away."


def test_conversation_pairs_share_their_prompt_turns():
    shared = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tell me a joke"},
    ]
    data = {
        "prompt": "Tell me a joke",
        "chosen": [*shared, {"role": "assistant", "content": "Why did the chicken..."}],
        "rejected": [*shared, {"role": "assistant", "content": "No."}],
    }
    prompt, chosen, rejected = split_preference(row(data))
    assert prompt == shared
    assert chosen["content"] == "Why did the chicken..." and rejected["content"] == "No."


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"prompt": "Hi", "chosen": "Same", "rejected": "Same"}, "the same"),
        ({"prompt": "Hi", "chosen": "Yes"}, "missing field 'rejected'"),
        ({"prompt": "Hi", "chosen": "Yes", "rejected": "  "}, "'rejected' is empty"),
        ({"prompt": "", "chosen": "Yes", "rejected": "No"}, "'prompt'"),
        ({"prompt": "Hi", "chosen": "Yes", "rejected": ["No"]}, "both be strings"),
        (
            {
                "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            },
            "the same",
        ),
        (
            {
                "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                "rejected": [{"role": "user", "content": "OTHER"}, {"role": "assistant", "content": "c"}],
            },
            "one final assistant turn",
        ),
    ],
)
def test_bad_pairs_name_their_line(data, message):
    with pytest.raises(UserError) as caught:
        split_preference(row(data))
    assert "pairs.jsonl:7" in str(caught.value) and message in str(caught.value)


def test_only_the_final_reply_is_trained_and_overlong_pairs_are_counted(tokenizer):
    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there."},
        {"role": "user", "content": "Sum 2 and 2"},
    ]
    pair = {
        "chosen": [*history, {"role": "assistant", "content": "4."}],
        "rejected": [*history, {"role": "assistant", "content": "5, I think."}],
    }
    long_pair = {"prompt": "word " * 200, "chosen": "a", "rejected": "b"}
    examples, report = prepare_dpo([row(pair), Row("x:2", long_pair)], tokenizer, 128, "drop", "pairs.jsonl")
    assert report.rows == 2 and report.kept == 1 and report.dropped_overlong == 1
    (example,) = examples
    trained = [
        t for t, label in zip(example.chosen_ids, example.chosen_labels, strict=True) if label != IGNORE
    ]
    assert tokenizer.decode(trained) == "4.<|im_end|>"
    trained = [
        t for t, label in zip(example.rejected_ids, example.rejected_labels, strict=True) if label != IGNORE
    ]
    assert tokenizer.decode(trained) == "5, I think.<|im_end|>"
    assert example.chosen_ids[: len(example.prompt_ids)] == example.prompt_ids
    assert tokenizer.decode(example.prompt_ids).endswith("<|im_start|>assistant\n")


def test_collate_puts_each_pair_in_one_row(tokenizer):
    rows = [row({"prompt": f"Q{i}", "chosen": "yes" * (i + 1), "rejected": "no"}) for i in range(3)]
    examples, _ = prepare_dpo(rows, tokenizer, 128, "drop", "p")
    batch = collate_dpo(examples, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 3
    for i, example in enumerate(examples):
        shared, chosen, rejected = batch["segments"][i].tolist()
        # The prompt once, then both responses; the rejected one's positions continue from the prompt.
        assert example.chosen_ids[:shared] == example.rejected_ids[:shared] == example.prompt_ids
        end = chosen + rejected - shared
        assert batch["input_ids"][i, :end].tolist() == example.chosen_ids + example.rejected_ids[shared:]
        assert batch["position_ids"][i, chosen:end].tolist() == list(range(shared, rejected))
    split = split_pair_rows(batch)
    for i, example in enumerate(examples):
        assert split["input_ids"][i, : len(example.chosen_ids)].tolist() == example.chosen_ids
        assert split["input_ids"][3 + i, : len(example.rejected_ids)].tolist() == example.rejected_ids
    assert "reference" not in batch


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_pair_rows_score_as_separate_sequences(tiny_model, arch):
    """The shared-prompt rows give the log-probs that separate chosen and rejected sequences give, including
    responses that start with the same (trained) token, which must not be shared."""
    ignore = [IGNORE] * 4

    def pair(prompt, chosen, rejected):
        return DpoExample(
            prompt + chosen,
            ignore[: len(prompt)] + chosen,
            prompt + rejected,
            ignore[: len(prompt)] + rejected,
            "x",
            prompt,
        )

    examples = [pair([2, 5, 6, 7], [10, 11, 12], [13, 14]), pair([2, 8, 9], [20, 21], [20, 22, 23, 24])]
    model = attach_lora(
        load_base(ModelSpec(base=str(tiny_model(arch))), torch.device("cpu")), LoraSpec(dropout=0.0), False
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:  # a trained adapter, so the adapter's path is checked too
            torch.nn.init.normal_(param, std=0.5)
    batch = collate_dpo(examples, 1)
    with torch.no_grad():
        sums, counts = sequence_logprobs(model, batch)
        split = split_pair_rows(batch)
        logps, rows = label_logprobs(model, split["input_ids"], split["attention_mask"], split["labels"])
    assert counts.tolist() == [3, 2, 2, 4]
    torch.testing.assert_close(sums, torch.zeros(4).index_add(0, rows, logps), atol=1e-5, rtol=1e-5)


# -- the reference and step 0, on a real 4-bit model ----------------------------------------------------------


@pytest.fixture(scope="module")
def pairs(tokenizer):
    rows = [
        Row(
            f"p:{i}",
            {"prompt": f"What is {i} + {i}?", "chosen": f"It is {2 * i}.", "rejected": "No idea" * (i + 1)},
        )
        for i in range(6)
    ]
    examples, _ = prepare_dpo(rows, tokenizer, 128, "drop", "p")
    return examples


def policy_with_adapter(tiny_model, tmp_path: Path, trained_start: bool):
    """A 4-bit llama with LoRA. With trained_start, the adapter starts from saved non-zero weights (as after
    SFT) and a frozen copy of them is loaded as 'reference'."""
    # fp32: the cached and live passes batch the pairs differently, and bf16 rounding would differ with it.
    spec = ModelSpec(base=str(tiny_model("llama")), compute_dtype="fp32")
    lora = LoraSpec(r=4, alpha=8, dropout=0.1)
    if not trained_start:
        model = attach_lora(load_base(spec, torch.device("cpu")), lora, gradient_checkpointing=False)
        disable_dropout(model)
        return model, None
    torch.manual_seed(1)
    start = attach_lora(load_base(spec, torch.device("cpu")), lora, gradient_checkpointing=False)
    with torch.no_grad():
        for name, param in start.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    start.save_pretrained(tmp_path / "start")
    model = attach_lora(load_base(spec, torch.device("cpu")), lora, False, adapter=tmp_path / "start")
    model.load_adapter(str(tmp_path / "start"), adapter_name="reference", is_trainable=False)
    disable_dropout(model)
    return model, "reference"


@pytest.mark.parametrize("trained_start", [False, True], ids=["fresh-adapter", "sft-adapter"])
def test_cached_reference_equals_live_pass_and_step_0_is_log_2(
    tiny_model, tmp_path, pairs, tokenizer, trained_start
):
    model, reference_adapter = policy_with_adapter(tiny_model, tmp_path, trained_start)
    model.train()
    cached = compute_reference(
        model, pairs, 4, tokenizer.pad_token_id, torch.device("cpu"), Progress(), "train"
    )
    batch = collate_dpo(pairs, tokenizer.pad_token_id)
    live, counts = reference_logprobs(model, batch, reference_adapter)
    n = len(pairs)
    assert torch.allclose(cached[:, 0], live[:n].double(), atol=1e-4, rtol=0)
    assert torch.allclose(cached[:, 1], live[n:].double(), atol=1e-4, rtol=0)
    assert cached[:, 2].tolist() == counts[:n].tolist()

    if trained_start:  # the reference really is the starting adapter, not the bare base
        with torch.no_grad(), model.disable_adapter():
            base_only, _ = sequence_logprobs(model, batch)
        assert not torch.allclose(base_only, live, atol=1e-2)

    spec = DpoSpec(data={"train": "x.jsonl"}, beta=0.1)
    for examples, label in ((pairs, "live"), (pairs, "cached")):
        for example, values in zip(examples, cached.tolist(), strict=True):
            example.reference = tuple(values) if label == "cached" else None
        step = make_dpo_step(spec, reference_adapter)
        loss, metrics = step(model, collate_dpo(examples, tokenizer.pad_token_id), len(examples))
        assert loss.item() == pytest.approx(math.log(2), abs=1e-5), label
        assert abs(float(metrics["rewards/margin"])) < 1e-5
        assert abs(float(metrics["rewards/chosen"])) < 1e-5
        loss.backward()
        grads = [p.grad for n_, p in model.named_parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads)
        model.zero_grad()
    # RPO at step 0: log 2 plus rpo_alpha times the chosen replies' NLL per token, averaged over the pairs.
    rpo = make_dpo_step(DpoSpec(data={"train": "x.jsonl"}, beta=0.1, rpo_alpha=0.5), reference_adapter)
    loss, metrics = rpo(model, collate_dpo(pairs, tokenizer.pad_token_id), len(pairs))
    nll = float((-cached[:, 0] / cached[:, 2]).mean())
    assert nll > 0.1
    assert loss.item() == pytest.approx(math.log(2) + 0.5 * nll, abs=1e-4)
    assert float(metrics["nll/chosen"]) == pytest.approx(nll, abs=1e-4)
    for example in pairs:
        example.reference = None


# -- end to end ---------------------------------------------------------------------------------------------


def dpo_metrics(folder: Path) -> list[dict]:
    path = folder / "runs" / "tiny" / "dpo" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_does_sft_then_dpo_from_the_sft_adapter(tmp_path, tiny_model):
    recipe = add_dpo(write_recipe(tmp_path, tiny_model("llama"), max_steps=6, save_every=0, eval_every=0))
    # fp32 (whatever this CPU's `auto` is), so the cached reference can be checked tightly below.
    data = yaml.safe_load(recipe.read_text())
    data["model"]["compute_dtype"] = "fp32"
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    result = qalign("run", str(recipe), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "runs" / "tiny"
    assert (out / "sft" / "adapter").is_dir() and (out / "dpo" / "adapter").is_dir()
    assert f"LoRA from {out / 'sft' / 'adapter'}" in result.stdout

    records = [r for r in dpo_metrics(tmp_path) if not r.get("final")]
    first = records[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(first["rewards/margin"]) < 1e-5
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracy",
        "logps/chosen",
        "logps/rejected",
        "lr",
    ):
        assert key in first
    evaluated = [r for r in records if "eval_loss" in r]
    assert evaluated[-1]["eval_rewards/accuracy"] >= 0.875, evaluated
    assert evaluated[-1]["eval_rewards/margin"] > 0

    # The policy's starting log-probs are the SFT model's: compare the cached reference with a fresh
    # base + SFT adapter computed independently through peft.
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from qalign.stage_data import load_stage_data

    cache = next((out / "dpo" / "reference").glob("train-*.safetensors"))
    cached = load_file(cache)["reference"]
    sft_model = PeftModel.from_pretrained(
        load_base(ModelSpec(base=str(tiny_model("llama")), compute_dtype="fp32"), torch.device("cpu")),
        out / "sft" / "adapter",
    )
    from qalign.recipe_load import load_recipe

    loaded = load_recipe(recipe)
    train = load_stage_data(
        loaded, "dpo", AutoTokenizer.from_pretrained(out / "sft" / "adapter"), Progress()
    ).train
    batch = collate_dpo(train[:4], 1)
    with torch.no_grad():
        sums, _ = sequence_logprobs(sft_model, batch)
    assert torch.allclose(sums[:4].double(), cached[:4, 0], atol=1e-4)

    # Running again finds everything done.
    again = qalign("run", str(recipe), cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.count("already complete") == 2


def test_live_reference_from_a_fresh_adapter_learns_the_preference(tmp_path, tiny_model):
    recipe = add_dpo(write_recipe(tmp_path, tiny_model("llama")), reference="live")
    result = qalign("dpo", str(recipe), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "LoRA r=8" in result.stdout  # no sft adapter: a fresh one
    assert not (tmp_path / "runs" / "tiny" / "dpo" / "reference").exists()  # live: nothing cached
    records = [r for r in dpo_metrics(tmp_path) if not r.get("final")]
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert [r for r in records if "eval_loss" in r][-1]["eval_rewards/accuracy"] >= 0.875


def test_precomputed_reference_is_cached_and_reused(tmp_path, tiny_model):
    recipe = add_dpo(write_recipe(tmp_path, tiny_model("llama")), max_steps=2)
    first = qalign("dpo", str(recipe), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert re.search(r"reference log-probs for \d+ train pairs cached in", first.stdout)
    assert "reference train pair " in first.stdout
    cache = sorted((tmp_path / "runs" / "tiny" / "dpo" / "reference").iterdir())
    assert [p.name.split("-")[0] for p in cache] == ["eval", "train"]
    again = qalign("dpo", str(recipe), "--no-resume", "--overwrite", "--set", "dpo.max_steps=3", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "read from" in again.stdout and "cached in" not in again.stdout
    # Truncating changes the tokenized data, so the key and the cache.
    third = qalign("dpo", str(recipe), "--no-resume", "--overwrite", "--set", "dpo.max_length=30",
                   "--set", "dpo.overlong=truncate", cwd=tmp_path)  # fmt: skip
    assert third.returncode == 0 and "cached in" in third.stdout


def test_validate_dumps_preference_token_ids(tmp_path, tiny_model):
    recipe = add_dpo(write_recipe(tmp_path, tiny_model("llama")))
    dump = tmp_path / "pairs.jsonl"
    result = qalign("validate", str(recipe), "--stage", "dpo", "--dump", str(dump), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(records) == 40
    assert set(records[0]) == {"prompt_ids", "chosen_ids", "rejected_ids"}
    assert records[0]["chosen_ids"] != records[0]["rejected_ids"]
