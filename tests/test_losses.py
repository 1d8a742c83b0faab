"""The SFT loss, the learning-rate schedule, step counting and the data order, against numbers worked out by
hand. (The DPO losses are in test_dpo_loss.py.)"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from qalign.distributed import SINGLE, World
from qalign.losses import sft_loss
from qalign.recipe import DataSpec, TrainSpec
from qalign.train import Stage, Trainer, lr_factor, total_steps


def spec(**overrides) -> TrainSpec:
    return TrainSpec(data=DataSpec(train="train.jsonl"), **overrides)


# -- sft_loss ---------------------------------------------------------------------------------------------


def test_sft_loss_mean_over_the_micro_batch():
    """log p = [-1, -2, -3], 3 trained tokens in the step: -(-1 - 2 - 3) / 3 = 6 / 3 = 2.0."""
    loss = sft_loss(torch.tensor([-1.0, -2.0, -3.0]), num_tokens=3)
    assert loss.item() == 2.0


def test_sft_loss_normalizes_by_the_whole_step():
    """Same tokens, but the step has another micro-batch with 3 more trained tokens (6 in all):
    -(-1 - 2 - 3) / 6 = 6 / 6 = 1.0, this micro-batch's share of the step mean."""
    loss = sft_loss(torch.tensor([-1.0, -2.0, -3.0]), num_tokens=6)
    assert loss.item() == 1.0


def test_sft_loss_accumulated_shares_equal_the_token_mean():
    """Micro-batch A has 1 token (log p -4), B has 3 (-1, -2, -3), 4 in the step:
    4/4 + 6/4 = 2.5 = mean(4, 1, 2, 3); averaging per micro-batch would give (4 + 2) / 2 = 3.0 instead."""
    a = sft_loss(torch.tensor([-4.0]), num_tokens=4)
    b = sft_loss(torch.tensor([-1.0, -2.0, -3.0]), num_tokens=4)
    assert (a + b).item() == 2.5


def test_sft_loss_gradient_is_per_token():
    """d/d logp_i of -sum(logp) / N is -1/N for every token: -1/4 = -0.25."""
    logps = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    sft_loss(logps, num_tokens=4).backward()
    assert logps.grad.tolist() == [-0.25, -0.25, -0.25]


def test_sft_loss_with_no_trained_tokens_is_zero_not_nan():
    """An empty micro-batch: -0 / max(0, 1) = 0."""
    loss = sft_loss(torch.zeros(0), num_tokens=0)
    assert loss.item() == 0.0


# -- lr_factor ----------------------------------------------------------------------------------------------


def test_cosine_with_warmup():
    """warmup_ratio 0.1 of 100 steps: warmup = ceil(10) = 10 steps (0..9) at (step + 1) / (warmup + 1),
    so step 0 -> 1/11 and step 9 -> 10/11; after it progress = (step - 10) / (100 - 10) and the factor is
    0.5 * (1 + cos(pi * progress)): step 10 -> progress 0 -> 1.0; step 55 -> 45/90 = 0.5 -> 0.5 * (1 + 0)
    = 0.5; step 99 -> 89/90 -> 0.5 * (1 + cos(89 pi / 90)) = 0.5 * (1 - 0.999391) = 0.000304586."""
    s = spec(scheduler="cosine", warmup_ratio=0.1)
    assert lr_factor(s, 0, 100) == pytest.approx(1 / 11, abs=1e-12)
    assert lr_factor(s, 9, 100) == pytest.approx(10 / 11, abs=1e-12)
    assert lr_factor(s, 10, 100) == pytest.approx(1.0, abs=1e-12)
    assert lr_factor(s, 55, 100) == pytest.approx(0.5, abs=1e-12)
    assert lr_factor(s, 99, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)), abs=1e-12)
    assert lr_factor(s, 99, 100) == pytest.approx(0.000304586, abs=1e-9)


def test_linear_with_warmup():
    """Same warmup (1/11 at 0, 10/11 at 9); then 1 - progress: step 10 -> 1.0, step 55 -> 1 - 45/90 = 0.5,
    step 99 -> 1 - 89/90 = 1/90 = 0.0111..., and never below 0 (step 100 -> 1 - 90/90 = 0)."""
    s = spec(scheduler="linear", warmup_ratio=0.1)
    assert lr_factor(s, 0, 100) == pytest.approx(1 / 11, abs=1e-12)
    assert lr_factor(s, 9, 100) == pytest.approx(10 / 11, abs=1e-12)
    assert lr_factor(s, 10, 100) == pytest.approx(1.0, abs=1e-12)
    assert lr_factor(s, 55, 100) == pytest.approx(0.5, abs=1e-12)
    assert lr_factor(s, 99, 100) == pytest.approx(1 / 90, abs=1e-12)
    assert lr_factor(s, 100, 100) == 0.0
    assert lr_factor(s, 150, 100) == 0.0


def test_constant_with_warmup():
    """Same warmup, then 1.0 for every remaining step."""
    s = spec(scheduler="constant", warmup_ratio=0.1)
    assert lr_factor(s, 0, 100) == pytest.approx(1 / 11, abs=1e-12)
    assert lr_factor(s, 9, 100) == pytest.approx(10 / 11, abs=1e-12)
    for step in (10, 55, 99):
        assert lr_factor(s, step, 100) == 1.0


def test_no_warmup_starts_at_the_peak():
    """warmup_ratio 0 -> warmup 0: cosine at step 0 is 0.5 * (1 + cos 0) = 1.0; linear 1 - 0 = 1.0."""
    for scheduler in ("cosine", "linear", "constant"):
        assert lr_factor(spec(scheduler=scheduler, warmup_ratio=0.0), 0, 100) == 1.0


def test_warmup_is_monotonic_and_never_zero():
    s = spec(scheduler="cosine", warmup_ratio=0.1)
    factors = [lr_factor(s, step, 100) for step in range(11)]
    assert all(0 < a < b for a, b in itertools.pairwise(factors))


def test_small_warmup_rounds_up_to_one_step():
    """warmup_ratio 0.03 of 10 steps: ceil(0.3) = 1 warmup step -> step 0 at 1/2, step 1 at the peak."""
    s = spec(scheduler="cosine", warmup_ratio=0.03)
    assert lr_factor(s, 0, 10) == pytest.approx(0.5, abs=1e-12)
    assert lr_factor(s, 1, 10) == pytest.approx(1.0, abs=1e-12)


def test_warmup_steps_are_not_inflated_by_float_error():
    """warmup_ratio 0.07 of 100 steps is 7 warmup steps (0..6): step 6 -> 7/8, step 7 -> the peak 1.0."""
    s = spec(scheduler="constant", warmup_ratio=0.07)
    assert lr_factor(s, 6, 100) == pytest.approx(7 / 8, abs=1e-12)
    assert lr_factor(s, 7, 100) == 1.0


# -- total_steps ------------------------------------------------------------------------------------------


def test_total_steps_from_epochs():
    """10 examples in batches of 4 -> ceil(10/4) = 3 micro-batches; 2 per step -> ceil(3/2) = 2 steps per
    epoch; 3 epochs -> 6."""
    assert total_steps(spec(batch_size=4, grad_accum=2, epochs=3), 10) == (6, 2)


def test_max_steps_overrides_epochs():
    assert total_steps(spec(batch_size=4, grad_accum=2, epochs=3, max_steps=5), 10) == (5, 2)
    assert total_steps(spec(batch_size=4, grad_accum=2, epochs=3, max_steps=50), 10) == (50, 2)


def test_total_steps_edge_cases():
    """8 examples, batch 4, accum 2: exactly 1 step per epoch. 1 example, batch 4, accum 8: still 1 step."""
    assert total_steps(spec(batch_size=4, grad_accum=2, epochs=1), 8) == (1, 1)
    assert total_steps(spec(batch_size=4, grad_accum=8, epochs=2), 1) == (2, 1)


# -- Trainer.micro_batches ------------------------------------------------------------------------------


def trainer_for(
    n: int, seed: int = 0, batch_size: int = 4, grad_accum: int = 2, world: World = SINGLE
) -> Trainer:
    """A Trainer with only what micro_batches and share read (no model or optimizer)."""
    s = spec(batch_size=batch_size, grad_accum=grad_accum, epochs=3)
    stage = Stage(
        name="sft",
        spec=s,
        train=list(range(n)),
        eval=None,
        collate=lambda examples: {},
        step_loss=lambda model, batch, norm: (torch.zeros(()), {}),
        weight=lambda example: 1,
    )
    trainer = Trainer.__new__(Trainer)
    trainer.stage, trainer.spec, trainer.seed, trainer.world = stage, s, seed, world
    trainer.total, trainer.per_epoch = total_steps(s, n, world.size)
    return trainer


def test_micro_batches_cover_each_epoch_once():
    """10 examples, batch 4, accum 2: step 0 of an epoch gets 2 micro-batches (4 + 4), step 1 the last one
    (2 examples); together every example exactly once."""
    trainer = trainer_for(10)
    for epoch in range(3):
        first, second = trainer.micro_batches(2 * epoch), trainer.micro_batches(2 * epoch + 1)
        assert [len(b) for b in first] == [4, 4]
        assert [len(b) for b in second] == [2]
        assert sorted(e for batch in first + second for e in batch) == list(range(10))


def test_micro_batches_are_a_pure_function_of_seed_and_step():
    trainer = trainer_for(10)
    assert trainer_for(10).micro_batches(3) == trainer.micro_batches(3) == trainer.micro_batches(3)
    epochs = [
        [e for step in (2 * k, 2 * k + 1) for b in trainer.micro_batches(step) for e in b] for k in range(3)
    ]
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]  # reshuffled each epoch
    other = [e for step in (0, 1) for b in trainer_for(10, seed=1).micro_batches(step) for e in b]
    assert other != epochs[0]


def test_ranks_share_the_micro_batches_one_process_would_take():
    """2 processes with grad_accum 1 take, at every step, the micro-batches 1 process with grad_accum 2 takes:
    rank 0 the first, rank 1 the second. 10 examples in batches of 4 make 3 micro-batches an epoch, so each
    epoch's second step has one; rank 1 repeats it with its weight zero (each backward is a collective)."""
    one = trainer_for(10, grad_accum=2)
    ranks = [trainer_for(10, grad_accum=1, world=World(rank, 2)) for rank in range(2)]
    assert one.per_epoch == ranks[0].per_epoch == 2
    for step in range(6):
        micro = one.micro_batches(step)
        assert ranks[0].micro_batches(step) == ranks[1].micro_batches(step) == micro
        shares = [r.share(micro) for r in ranks]
        if len(micro) == 2:
            assert shares == [[(micro[0], True)], [(micro[1], True)]]
        else:
            assert shares == [[(micro[0], True)], [(micro[0], False)]]
    # Every example trained once an epoch, whatever the process count.
    counted = [
        e
        for step in (0, 1)
        for r in ranks
        for batch, on in r.share(r.micro_batches(step))
        if on
        for e in batch
    ]
    assert sorted(counted) == list(range(10))
