"""The training loop's mixed precision: fp16 with loss scaling, whose overflowing steps are skipped by the
scaler and not counted by the schedule."""

from __future__ import annotations

import torch

from qalign.layout import StagePaths
from qalign.progress import Progress
from qalign.recipe import SftSpec
from qalign.train import Stage, Trainer


def trainer(tmp_path, blow_up: list[bool]) -> Trainer:
    """A one-weight model whose loss overflows fp16 on the steps where blow_up says so."""
    model = torch.nn.Linear(1, 1, bias=False)
    spec = SftSpec(data={"train": "unused.jsonl"}, lr=0.1, max_steps=4, batch_size=1, warmup_ratio=0.0)
    spec = spec.model_copy(update={"batch_size": 1, "gradient_checkpointing": False, "scheduler": "linear"})

    def step_loss(model: torch.nn.Module, batch: dict, norm: int) -> tuple[torch.Tensor, dict]:
        scale = 1e30 if blow_up.pop(0) else 1.0
        loss = model(batch["x"]).float().sum() * scale
        return loss, {"loss": min(float(loss.detach()), 1.0)}

    stage = Stage(
        name="sft",
        spec=spec,
        train=[0, 1, 2, 3],
        eval=None,
        collate=lambda examples: {"x": torch.ones(1, 1), "attention_mask": torch.ones(1, 1)},
        step_loss=step_loss,
        weight=lambda example: 1,
    )
    fingerprint = {"identity": {}, "data_hash": ""}
    return Trainer(
        stage, model, StagePaths(tmp_path), 0, torch.device("cpu"), torch.float16, Progress(), fingerprint
    )


def test_fp16_uses_a_loss_scaler_and_an_overflow_skips_the_update_and_the_schedule(tmp_path):
    run = trainer(tmp_path, blow_up=[False, True, False])
    assert run.scaler.is_enabled()
    # The default initial scale (2^16) overflows this one-weight model's fp16 gradient by itself.
    run.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    weight = run.model.weight.detach().clone()

    first = run._train_step()
    run.step += 1
    assert "scaler_skipped" not in first and not torch.equal(run.model.weight, weight)
    lr_after_first = run.scheduler.get_last_lr()[0]
    scale = run.scaler.get_scale()

    weight = run.model.weight.detach().clone()
    overflow = run._train_step()
    run.step += 1
    assert overflow["scaler_skipped"] is True
    assert torch.equal(run.model.weight, weight)  # no update
    assert run.scaler.get_scale() < scale  # the scaler backed off
    assert run.scheduler.get_last_lr()[0] == lr_after_first  # the schedule waits for a real step

    third = run._train_step()
    assert "scaler_skipped" not in third and run.scheduler.get_last_lr()[0] < lr_after_first


def test_fp32_and_bf16_train_without_a_scaler(tmp_path):
    for dtype in (torch.float32, torch.bfloat16):
        run = trainer(tmp_path, blow_up=[False])
        run = Trainer(
            run.stage, run.model, run.paths, 0, torch.device("cpu"), dtype, Progress(), run.fingerprint
        )
        assert not run.scaler.is_enabled()
        assert run._train_step()["grad_norm"] > 0


def test_fp16_cli_run_saves_the_scaler_and_resumes(tmp_path, tiny_model):
    import json

    from conftest import write_recipe
    from test_cli_sft import qalign

    recipe = write_recipe(tmp_path, tiny_model("llama"), max_steps=4, save_every=2, eval_every=0)
    fp16 = ("--set", "model.compute_dtype=fp16")
    result = qalign("sft", str(recipe), *fp16, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "tiny" / "sft"
    assert (run / "checkpoints" / "step-4" / "scaler.pt").exists()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if not r.get("final")]
    assert len(steps) == 4 and all(r["loss"] == r["loss"] for r in steps)  # finite, not NaN
    assert any("scaler_skipped" not in r for r in steps)  # at least one real update
