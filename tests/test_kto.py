"""KTO in the DPO stage: unpaired rows, their mismatched pairs for the KL estimate, the step, and `qalign dpo`
with `loss: kto` end to end."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TOKENIZER, add_dpo, preference_rows, write_jsonl, write_recipe
from test_cli_sft import qalign

from qalign.chat_template import IGNORE
from qalign.data import Row, pad
from qalign.errors import UserError
from qalign.kto import (
    KtoReport,
    collate_kto,
    is_unpaired,
    kl_partners,
    make_kto_step,
    parse_unpaired,
    prepare_kto,
    summarize_kto,
)
from qalign.logprobs import label_logprobs
from qalign.losses import kto_loss
from qalign.model import attach_lora, load_base
from qalign.progress import Progress
from qalign.recipe import DpoSpec, LoraSpec, ModelSpec
from qalign.reference import compute_reference


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


def kto_rows(n_pairs: int, start: int = 0) -> list[dict]:
    """preference_rows unpaired as TRL does: each pair a desirable and an undesirable row, sharing a prompt."""
    rows = []
    for pair in preference_rows(n_pairs, start):
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    return rows


def rows_of(*datas: dict) -> list[Row]:
    return [Row(f"kto.jsonl:{i + 1}", data) for i, data in enumerate(datas)]


def spec(**overrides) -> DpoSpec:
    return DpoSpec(data={"train": "x.jsonl", **overrides.pop("data", {})}, **overrides)


# -- data ----------------------------------------------------------------------------------------------------


def test_rows_take_prompts_and_completions_as_strings_or_messages():
    (row,) = rows_of(
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            "completion": [{"role": "assistant", "content": "Hello."}],
            "label": 0,
        }
    )
    prompt, reply, label = parse_unpaired(row)
    assert [m["role"] for m in prompt] == ["system", "user"]
    assert reply == {"role": "assistant", "content": "Hello."} and label is False
    for value, expected in ((True, True), (1, True), ("false", False), (" TRUE ", True), ("0", False)):
        (row,) = rows_of({"prompt": "Hi", "completion": "Hello.", "label": value})
        assert parse_unpaired(row)[2] is expected


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"prompt": "Hi", "completion": "Hello."}, "missing field 'label'"),
        ({"prompt": "Hi", "completion": "Hello.", "label": "yes"}, "'label' must be true"),
        ({"prompt": "Hi", "completion": "Hello.", "label": 2}, "got 2"),
        ({"prompt": "Hi", "completion": "  ", "label": True}, "'completion' is empty"),
        ({"prompt": "", "completion": "Hello.", "label": True}, "'prompt' must be"),
        (
            {
                "prompt": "Hi",
                "completion": [{"role": "assistant", "content": "A"}, {"role": "user", "content": "B"}],
                "label": True,
            },
            "one assistant turn",
        ),
    ],
)
def test_bad_rows_name_their_line(data, message):
    with pytest.raises(UserError) as caught:
        parse_unpaired(rows_of(data)[0])
    assert "kto.jsonl:1" in str(caught.value) and message in str(caught.value)


def test_a_dataset_with_one_kind_of_label_is_an_error(tokenizer):
    rows = rows_of(*({"prompt": f"Q{i}", "completion": "A", "label": True} for i in range(3)))
    with pytest.raises(UserError, match="every row is desirable"):
        prepare_kto(rows, tokenizer, 128, "drop", "kto.jsonl")


def test_the_loss_and_the_data_must_agree():
    unpaired = rows_of({"prompt": "Hi", "completion": "Hello.", "label": True})
    pairs = rows_of({"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."})
    assert is_unpaired(unpaired, spec(loss="kto"), "r.yaml")
    assert not is_unpaired(pairs, spec(), "r.yaml")
    with pytest.raises(UserError, match=r"kto.jsonl:1: .*dpo.loss: sigmoid cannot take; set dpo.loss: kto"):
        is_unpaired(unpaired, spec(), "r.yaml")
    with pytest.raises(UserError, match=r"kto.jsonl:1: dpo.loss: kto takes unpaired rows .*'chosen'"):
        is_unpaired(pairs, spec(loss="kto"), "r.yaml")
    with pytest.raises(UserError, match=r"r.yaml: dpo.data.format: unpaired: .*set dpo.loss: kto"):
        is_unpaired(pairs, spec(data={"format": "unpaired"}, loss="hinge"), "r.yaml")
    with pytest.raises(UserError, match=r"r.yaml: dpo.data.format: preference: dpo.loss: kto"):
        is_unpaired(unpaired, spec(data={"format": "preference"}, loss="kto"), "r.yaml")


def test_mismatched_pairs_skip_rows_that_share_the_prompt_or_the_completion():
    # Rows 0-1 and 2-3 share prompts (as data unpaired from preference pairs does); row 4's completion is row
    # 0's, so row 0 passes it by.
    prompts = ["p", "p", "q", "q", "r"]
    completions = ["a", "b", "c", "d", "a"]
    partners, fallbacks = kl_partners(prompts, completions)
    assert partners == [2, 2, 4, 4, 1] and fallbacks == 0
    # One prompt everywhere: the next different completion, counted as a fallback; all alike: the next row.
    assert kl_partners(["p", "p", "p"], ["a", "a", "b"]) == ([2, 2, 0], 3)
    assert kl_partners(["p", "p"], ["a", "a"]) == ([1, 0], 2)


def test_each_row_is_its_completion_then_a_mismatched_one_after_its_own_prompt(tokenizer):
    rows = rows_of(*kto_rows(2), {"prompt": "word " * 200, "completion": "a", "label": True})
    examples, report = prepare_kto(rows, tokenizer, 128, "drop", "kto.jsonl", weights=(1.0, 1.0))
    assert report.rows == 5 and report.kept == 4 and report.dropped_overlong == 1
    assert (report.desirable, report.undesirable) == (2, 2)
    # Row 3 (index 2) is the third row's, a fresh prompt; row 1's mismatched completion is row 3's.
    first = examples[0]
    assert first.desirable and not examples[1].desirable

    def trained(ids, labels):
        return tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE])

    assert trained(first.chosen_ids, first.chosen_labels) == "The answer is 0.<|im_end|>"
    assert trained(first.rejected_ids, first.rejected_labels) == f"{kto_rows(2)[2]['completion']}<|im_end|>"
    assert first.rejected_ids[: len(first.prompt_ids)] == first.prompt_ids
    assert "What is 0 + 0?" in tokenizer.decode(first.prompt_ids)
    # Only the row's own completion is trained.
    assert report.trained_tokens == sum(sum(label != IGNORE for label in e.chosen_labels) for e in examples)
    batch = collate_kto(examples, tokenizer.pad_token_id)
    assert batch["desirable"].tolist() == [True, False, True, False]


def test_an_overlong_mismatched_completion_is_cut_not_dropped(tokenizer):
    rows = rows_of(
        {"prompt": "Hi", "completion": "Hello.", "label": True},
        {"prompt": "Yo", "completion": "word " * 200, "label": False},
    )
    examples, report = prepare_kto(rows, tokenizer, 64, "truncate", "kto.jsonl")
    assert report.kept == 2 and report.truncated == 1 and report.kl_truncated == 1
    assert len(examples[0].rejected_ids) == 64 and len(examples[0].chosen_ids) < 64
    assert any(
        "1 mismatched completions of the KL estimate cut to dpo.max_length" in w
        for w in report.warnings("dpo")
    )


@pytest.mark.parametrize(
    ("weights", "counts", "warned"),
    [((1.0, 1.0), (10, 10), False), ((1.0, 1.0), (13, 10), False), ((1.0, 1.0), (5, 10), True),
     ((2.0, 1.0), (5, 10), False), ((1.0, 1.0), (20, 10), True)],
)  # fmt: skip
def test_an_unbalanced_weighting_is_warned_about(weights, counts, warned):
    """desirable_weight * n_D / (undesirable_weight * n_U): 1, 1.3, 0.5, 1.0, 2.0; the paper's range is [1, 4/3]."""
    report = KtoReport(source="kto.jsonl", weights=weights, desirable=counts[0], undesirable=counts[1])
    lines = [w for w in report.warnings("dpo") if "KTO paper recommends" in w]
    assert bool(lines) == warned
    if warned and counts == (5, 10):  # weights of 2 to 2.67 would balance 5 desirable rows against 10
        assert "dpo.desirable_weight between 2 and 2.67" in lines[0]
    assert not KtoReport(source="e", desirable=5, undesirable=10).warnings("dpo")  # eval: not checked


def test_metrics_are_means_over_the_rows_of_each_label():
    """Two micro-batches' sums: desirable rewards 0.3 + 0.1 over 2 rows = 0.2, undesirable -0.6 over 3 = -0.2,
    margin 0.2 - (-0.2) = 0.4; a step without undesirable rows has neither their mean nor a margin."""
    sums = {
        "loss": 0.5,
        "kl": 0.1,
        "_count/desirable": 2.0,
        "_rewards/desirable": 0.4,
        "_logps/desirable": -8.0,
    }
    sums |= {"_count/undesirable": 3.0, "_rewards/undesirable": -0.6, "_logps/undesirable": -30.0}
    out = summarize_kto(sums)
    assert out == pytest.approx(
        {"loss": 0.5, "kl": 0.1, "rewards/desirable": 0.2, "rewards/undesirable": -0.2, "rewards/margin": 0.4,
         "logps/desirable": -4.0, "logps/undesirable": -10.0}
    )  # fmt: skip
    only = summarize_kto({**sums, "_count/undesirable": 0.0})
    assert "rewards/undesirable" not in only and "rewards/margin" not in only


# -- the step, on a real 4-bit model -------------------------------------------------------------------------


def test_step_scores_each_row_and_its_mismatched_pair(tiny_model, tokenizer):
    rows = rows_of(*kto_rows(3))
    examples, _ = prepare_kto(rows, tokenizer, 128, "drop", "kto.jsonl")
    model = attach_lora(
        load_base(ModelSpec(base=str(tiny_model("llama")), compute_dtype="fp32"), torch.device("cpu")),
        LoraSpec(r=4, alpha=8, dropout=0.0),
        False,
    )
    cached = compute_reference(
        model, examples, 4, tokenizer.pad_token_id, torch.device("cpu"), Progress(), "t"
    )
    for example, values in zip(examples, cached.tolist(), strict=True):
        example.reference = tuple(values)
    kto = spec(loss="kto", beta=0.1, desirable_weight=1.0, undesirable_weight=1.5)
    step = make_kto_step(kto, None)
    batch = collate_kto(examples, tokenizer.pad_token_id)
    n = len(examples)
    # Step 0: the policy is its reference, r = z0 = 0, each row's loss half its weight: (3 * 1 + 3 * 1.5) / 2 / 6.
    loss, metrics = step(model, batch, n)
    assert loss.item() == pytest.approx((3 * 0.5 + 3 * 0.75) / 6, abs=1e-5)
    assert float(metrics["kl"]) == 0.0

    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    # A reference 5 nats less likely on the mismatched side, so that z0 > 0 and the reference point is used.
    start = cached.clone()
    cached[:, 1] -= 5.0
    for example, values in zip(examples, cached.tolist(), strict=True):
        example.reference = tuple(values)
    batch = collate_kto(examples, tokenizer.pad_token_id)
    loss, metrics = step(model, batch, 2 * n)  # half of a step of 2 micro-batches
    # Independently: each side as its own sequence, scored through the plain forward.
    sides = [(e.chosen_ids, e.chosen_labels) for e in examples] + [
        (e.rejected_ids, e.rejected_labels) for e in examples
    ]
    ids = torch.tensor(pad([s[0] for s in sides], 0))
    with torch.no_grad():
        logps, owner = label_logprobs(
            model,
            ids,
            torch.tensor(pad([[1] * len(s[0]) for s in sides], 0)),
            torch.tensor(pad([s[1] for s in sides], IGNORE)),
        )
    sums = torch.zeros(2 * n).index_add(0, owner, logps)
    desirable = batch["desirable"]
    expected, rewards, z0 = kto_loss(
        sums[:n], cached[:, 0].float(), sums[n:], cached[:, 1].float(), desirable, 0.1, 1.0, 1.5
    )
    assert z0.item() > 0
    assert loss.item() == pytest.approx(expected.sum().item() / (2 * n), abs=1e-5)
    assert float(metrics["kl"]) == pytest.approx(z0.item() * n / (2 * n), abs=1e-5)
    assert float(metrics["_rewards/desirable"]) == pytest.approx(rewards[desirable].sum().item(), abs=1e-5)
    loss.backward()
    assert all(p.grad is not None for n_, p in model.named_parameters() if p.requires_grad)
    # dpo.reference: live, from a fresh adapter: the reference is the base, the adapter disabled.
    live = {key: value for key, value in batch.items() if key != "reference"}
    expected, _, _ = kto_loss(
        sums[:n], start[:, 0].float(), sums[n:], start[:, 1].float(), desirable, 0.1, 1.0, 1.5
    )
    assert step(model, live, n)[0].item() == pytest.approx(expected.sum().item() / n, abs=1e-5)


# -- end to end ---------------------------------------------------------------------------------------------


def kto_recipe(tmp_path: Path, tiny_model, **overrides) -> Path:
    recipe = add_dpo(write_recipe(tmp_path, tiny_model("llama")), loss="kto", **overrides)
    write_jsonl(tmp_path / "data" / "dpo.jsonl", kto_rows(16))
    write_jsonl(tmp_path / "data" / "dpo_eval.jsonl", kto_rows(4, start=200))
    return recipe


def records(folder: Path) -> list[dict]:
    path = folder / "runs" / "tiny" / "dpo" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if '"final"' not in line]


def test_qalign_dpo_trains_kto_and_reuses_the_reference_cache(tmp_path, tiny_model):
    recipe = kto_recipe(tmp_path, tiny_model, max_steps=4, eval_every=4, save_every=2)
    data = yaml.safe_load(recipe.read_text())
    data["model"]["compute_dtype"] = "fp32"  # step 0's loss is then exactly 0.5
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    result = qalign("dpo", str(recipe), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "16 desirable and 16 undesirable rows" in result.stdout
    # Counted as rows (32: each label's 16), in the cache line and the reference pass's progress lines.
    assert "reference log-probs for 32 train rows cached in" in result.stdout
    assert "reference train row " in result.stdout and "pair" not in result.stdout
    logged = records(tmp_path)
    assert logged[0]["loss"] == pytest.approx(0.5, abs=1e-5) and logged[0]["kl"] == 0.0
    for record in logged:
        assert math.isfinite(record["loss"])
        for key in ("kl", "rewards/desirable", "rewards/undesirable", "rewards/margin", "logps/desirable"):
            assert key in record, (key, record)
        assert not any(key.startswith("_") for key in record)
    assert logged[-1]["loss"] < 0.5  # it learns
    evaluated = [r for r in logged if "eval_loss" in r]
    assert evaluated and "eval_rewards/margin" in evaluated[-1] and "eval_kl" in evaluated[-1]

    # As if killed after the step-2 checkpoint: the resume reads the cached reference and trains the same steps.
    run = tmp_path / "runs" / "tiny" / "dpo"
    shutil.rmtree(run / "adapter")
    shutil.rmtree(run / "checkpoints" / "step-4")
    resumed = qalign("dpo", str(recipe), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout and "step-2" in resumed.stdout
    assert "read from" in resumed.stdout and "cached in" not in resumed.stdout
    assert [(r["step"], r["loss"]) for r in records(tmp_path)] == [(r["step"], r["loss"]) for r in logged]


def test_validate_and_plan_know_kto(tmp_path, tiny_model):
    recipe = kto_recipe(tmp_path, tiny_model, desirable_weight=3.0)
    dump = tmp_path / "rows.jsonl"
    result = qalign("validate", str(recipe), "--stage", "dpo", "--dump", str(dump), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "16 desirable and 16 undesirable rows" in result.stdout
    assert "KTO paper recommends" in result.stdout + result.stderr  # 3 * 16 / 16 = 3 > 4/3
    first = json.loads(dump.read_text().splitlines()[0])
    assert (
        set(first) == {"prompt_ids", "completion_ids", "label", "kl_completion_ids"}
        and first["label"] is True
    )
    planned = qalign("plan", str(recipe), "--stage", "dpo", "--json", cwd=tmp_path)
    assert planned.returncode == 0, planned.stderr
    assert "KTO: one row per example" in " ".join(json.loads(planned.stdout)["assumptions"])

    # Pair data under loss: kto is one clear line, exit 2.
    write_jsonl(tmp_path / "data" / "dpo.jsonl", preference_rows(4))
    bad = qalign("validate", str(recipe), "--stage", "dpo", cwd=tmp_path)
    assert bad.returncode == 2 and "dpo.loss: kto takes unpaired rows" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_the_shipped_kto_recipe_validates(tmp_path):
    # recipes/demo-kto.yaml: the demo's 210 training pairs unpaired, one row of each label per pair, so the
    # default weights are in the KTO paper's range (1 * 210 / (1 * 210) = 1) and nothing is warned about.
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "demo-kto.yaml"
    result = qalign("validate", str(recipe), "--stage", "dpo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "objective: kto" in result.stdout
    assert "420 of 420 rows kept (210 desirable and 210 undesirable rows)" in result.stdout
    assert "20 desirable and 20 undesirable rows" in result.stdout
    assert "warning" not in (result.stdout + result.stderr).lower()
