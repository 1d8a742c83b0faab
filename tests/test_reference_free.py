"""The reference-free objectives (dpo.loss simpo and orpo): the recipe keys, the step loss on a real 4-bit
model, what `qalign validate` and `qalign plan` say, and end-to-end runs of `qalign dpo`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TOKENIZER, add_dpo, write_recipe
from test_cli_sft import qalign

from qalign import memory, model_shapes
from qalign.data import Row
from qalign.dpo import collate_dpo, disable_dropout, prepare_dpo, sequence_logprobs
from qalign.errors import UserError
from qalign.losses import orpo_loss, simpo_loss
from qalign.model import attach_lora, load_base
from qalign.recipe import DpoSpec, LoraSpec, ModelSpec
from qalign.recipe_load import load_recipe
from qalign.reference_free import make_reference_free_step

# -- the recipe ------------------------------------------------------------------------------------------------


def dpo_recipe(tmp_path: Path, tiny_model, **dpo) -> Path:
    return add_dpo(write_recipe(tmp_path, tiny_model("llama")), **dpo)


def without_beta(recipe: Path) -> Path:
    data = yaml.safe_load(recipe.read_text())
    del data["dpo"]["beta"]
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    return recipe


@pytest.mark.parametrize(("loss", "beta"), [("sigmoid", 0.1), ("simpo", 2.0), ("orpo", 0.1)])
def test_beta_auto_is_the_papers_value_for_the_loss(tmp_path, tiny_model, loss, beta):
    recipe = without_beta(dpo_recipe(tmp_path, tiny_model, loss=loss))
    assert load_recipe(recipe).dpo.beta == beta
    # An explicit beta wins, and --set reaches beta and loss alike.
    assert load_recipe(recipe, [f"dpo.loss={loss}", "dpo.beta=0.7"]).dpo.beta == 0.7
    assert load_recipe(recipe, ["dpo.beta=auto"]).dpo.beta == beta
    with pytest.raises(
        UserError, match=r"--set dpo.beta: dpo.beta: Input should be greater than 0 \(got 0\)"
    ):
        load_recipe(recipe, ["dpo.beta=0"])


@pytest.mark.parametrize(
    ("loss", "key", "value", "blamed"),
    [
        ("simpo", "reference", "live", "dpo.reference: live has no effect with dpo.loss: simpo"),
        ("orpo", "label_smoothing", 0.1, "dpo.label_smoothing: 0.1 has no effect with dpo.loss: orpo"),
        ("ipo", "label_smoothing", 0.1, "dpo.label_smoothing: 0.1 has no effect with dpo.loss: ipo"),
        ("sigmoid", "simpo_gamma", 1.0, "dpo.simpo_gamma: 1.0 has no effect with dpo.loss: sigmoid"),
        ("orpo", "rpo_alpha", 1.0, "dpo.rpo_alpha: 1.0 has no effect with dpo.loss: orpo"),
        ("simpo", "desirable_weight", 1.3, "dpo.desirable_weight: 1.3 has no effect with dpo.loss: simpo"),
        (
            "sigmoid",
            "undesirable_weight",
            0.5,
            "dpo.undesirable_weight: 0.5 has no effect with dpo.loss: sigmoid",
        ),
    ],
)
def test_a_key_the_loss_does_not_read_is_an_error_naming_its_line(
    tmp_path, tiny_model, loss, key, value, blamed
):
    recipe = dpo_recipe(tmp_path, tiny_model, loss=loss, **{key: value})
    line = next(
        i for i, text in enumerate(recipe.read_text().splitlines(), 1) if text.strip().startswith(key)
    )
    with pytest.raises(UserError, match=f"recipe.yaml:{line}: {blamed}"):
        load_recipe(recipe)
    with pytest.raises(UserError, match=f"--set dpo.{key}: "):
        load_recipe(dpo_recipe(tmp_path, tiny_model, loss=loss), [f"dpo.{key}={value}"])


def test_keys_at_their_defaults_are_accepted_as_qalign_init_writes_them(tmp_path, tiny_model):
    recipe = dpo_recipe(
        tmp_path, tiny_model, loss="orpo", reference="precompute", label_smoothing=0.0, simpo_gamma=0.5
    )
    assert load_recipe(recipe).dpo.reference_free


def test_cli_error_for_a_reference_with_a_reference_free_loss(tmp_path, tiny_model):
    recipe = dpo_recipe(tmp_path, tiny_model, loss="simpo")
    done = qalign("dpo", str(recipe), "--set", "dpo.reference=live", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--set dpo.reference: dpo.reference: live has no effect with dpo.loss: simpo" in done.stderr
    assert not (tmp_path / "runs").exists()


# -- the step loss on a real 4-bit model -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    rows = [
        Row(
            f"p:{i}",
            {"prompt": f"What is {i} + {i}?", "chosen": f"It is {2 * i}.", "rejected": "No" * (i + 1)},
        )
        for i in range(6)
    ]
    return prepare_dpo(rows, tokenizer, 128, "drop", "p")[0], tokenizer.pad_token_id


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_step_is_the_loss_of_mean_logps_and_accumulates_exactly(tiny_model, pairs, loss):
    """The step's loss is the pure function of each reply's summed log-probs over its trained tokens, and two
    micro-batches of 3 pairs (each divided by the step's 6) give the loss and gradients of one of 6."""
    examples, pad_id = pairs
    spec = ModelSpec(base=str(tiny_model("llama")), compute_dtype="fp32")
    model = attach_lora(
        load_base(spec, torch.device("cpu")), LoraSpec(r=4, alpha=8), gradient_checkpointing=False
    )
    disable_dropout(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # a trained adapter: the policy is not the base
                param.normal_(0, 0.5)
    dpo = DpoSpec(data={"train": "x.jsonl"}, loss=loss)
    step = make_reference_free_step(dpo)

    batch = collate_dpo(examples, pad_id)
    with torch.no_grad():
        sums, counts = sequence_logprobs(model, batch)
    means = sums / counts
    n = len(examples)
    if loss == "simpo":
        expected, chosen_rewards, rejected_rewards = simpo_loss(means[:n], means[n:], 2.0, 0.5)
    else:
        expected, nll, ratio = orpo_loss(means[:n], means[n:], 0.1)
        chosen_rewards, rejected_rewards = 0.1 * means[:n], 0.1 * means[n:]

    whole, metrics = step(model, batch, n)
    assert whole.item() == pytest.approx(expected.mean().item(), rel=1e-5)
    assert float(metrics["rewards/margin"]) == pytest.approx(
        (chosen_rewards - rejected_rewards).mean().item(), rel=1e-5
    )
    assert float(metrics["logps/chosen"]) == pytest.approx(sums[:n].mean().item(), rel=1e-5)
    assert float(metrics["rewards/accuracy"]) == (chosen_rewards > rejected_rewards).float().mean().item()
    if loss == "orpo":
        assert float(metrics["nll"]) == pytest.approx(nll.mean().item(), rel=1e-5)
        assert float(metrics["log_odds_ratio"]) == pytest.approx(ratio.mean().item(), rel=1e-5)
    else:
        assert "nll" not in metrics
    whole.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad.clone() for p in trained]
    model.zero_grad()

    halves = [step(model, collate_dpo(part, pad_id), n)[0] for part in (examples[:3], examples[3:])]
    assert sum(h.item() for h in halves) == pytest.approx(whole.item(), rel=1e-5)
    for half in halves:
        half.backward()
    for p, g in zip(trained, grads, strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-4)


# -- validate and plan ------------------------------------------------------------------------------------------


def test_validate_names_the_objective(tmp_path, tiny_model):
    recipe = without_beta(dpo_recipe(tmp_path, tiny_model, loss="simpo"))
    done = qalign("validate", str(recipe), "--stage", "dpo", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (
        "objective: simpo (SimPO, reference-free: no reference pass, nothing cached), beta 2, simpo_gamma 0.5"
        in (done.stdout.replace("\n", " "))
    )
    done = qalign("validate", str(recipe), "--stage", "dpo", "--set", "dpo.loss=sigmoid", cwd=tmp_path)
    assert "objective: sigmoid, beta 0.1, label_smoothing 0; reference log-probs precomputed" in done.stdout


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_plan_counts_no_reference(tmp_path, tiny_model, loss):
    recipe = load_recipe(dpo_recipe(tmp_path, tiny_model, loss=loss))
    config, source = model_shapes.load_config(recipe.model)
    arch = model_shapes.describe(config, recipe.model, source)
    lengths = memory.Lengths()
    plan = memory.estimate(arch, recipe, "dpo", lengths, "cpu")
    assert plan.components["dpo_reference"] == 0
    said = " ".join(plan.assumptions)
    assert f"{loss} is reference-free: no reference pass, nothing cached" in said
    assert "reference log-probs cached" not in said and "live reference" not in said


# -- end to end -------------------------------------------------------------------------------------------------


def records(folder: Path) -> list[dict]:
    path = folder / "runs" / "tiny" / "dpo" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if not json.loads(line).get("final")]


def test_simpo_run_has_no_reference_and_logs_its_metrics(tmp_path, tiny_model):
    recipe = dpo_recipe(tmp_path, tiny_model, loss="simpo", beta=2.0, max_steps=2, eval_every=1, save_every=0)
    done = qalign("dpo", str(recipe), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "objective: simpo" in done.stdout
    assert "reference log-probs" not in done.stdout  # no reference pass (it reports what it cached)
    assert not (tmp_path / "runs" / "tiny" / "dpo" / "reference").exists()  # nothing cached
    logged = records(tmp_path)
    for record in logged:
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"):
            assert math.isfinite(record[key]), (key, record)
    # SimPO starts, unlike DPO, from the policy's own rewards: not log 2 and not a zero margin.
    assert logged[0]["loss"] != pytest.approx(math.log(2), abs=1e-3)
    evals = [r for r in logged if "eval_loss" in r]
    assert evals[-1]["eval_rewards/margin"] > evals[0]["eval_rewards/margin"]


def test_orpo_runs_from_the_base_with_no_sft_stage(tmp_path, tiny_model):
    recipe = dpo_recipe(tmp_path, tiny_model, loss="orpo", max_steps=4, eval_every=2, save_every=0)
    data = yaml.safe_load(recipe.read_text())
    del data["sft"]
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    done = qalign("dpo", str(recipe), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (
        "LoRA r=8" in done.stdout and "starts from the base" not in done.stderr
    )  # a fresh adapter, no warning
    assert not (tmp_path / "runs" / "tiny" / "dpo" / "reference").exists()
    logged = records(tmp_path)
    for key in ("loss", "nll", "log_odds_ratio", "rewards/margin", "rewards/accuracy", "logps/chosen"):
        assert all(math.isfinite(r[key]) for r in logged), key
    # ORPO is SFT too: the chosen replies' NLL falls, and the odds ratio moves towards them.
    evals = [r for r in logged if "eval_loss" in r]
    assert evals[-1]["eval_nll"] < evals[0]["eval_nll"]
    assert evals[-1]["eval_log_odds_ratio"] > evals[0]["eval_log_odds_ratio"]
    assert (tmp_path / "runs" / "tiny" / "dpo" / "adapter" / "adapter_config.json").is_file()


def test_simpo_gamma_is_part_of_the_identity_only_for_simpo(tmp_path, tiny_model):
    """And KTO's weights only for kto: DPO checkpoints from before these keys existed still resume."""
    from qalign.identity import stage_identity

    recipe = dpo_recipe(tmp_path, tiny_model)
    identity = stage_identity(load_recipe(recipe), "dpo", torch.float32, None)["dpo"]
    assert not {"simpo_gamma", "desirable_weight", "undesirable_weight"} & identity.keys()
    simpo = load_recipe(recipe, ["dpo.loss=simpo", "dpo.simpo_gamma=1.0"])
    assert stage_identity(simpo, "dpo", torch.float32, None)["dpo"]["simpo_gamma"] == 1.0
