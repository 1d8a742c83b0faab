"""The one training loop every stage shares. A stage supplies its examples, a collate and a step loss; the
loop owns the data order, accumulation, mixed precision, optimizer and schedule, and when to evaluate, log and
checkpoint (what a checkpoint holds is checkpoint.py's; what the run folder holds is layout.py's)."""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from qalign.atomic import atomic_write_text
from qalign.checkpoint import CheckpointManager, restore_training_state, save_training_state
from qalign.distributed import (
    SINGLE,
    World,
    any_rank,
    barrier,
    full_states,
    gradient_sync,
    is_sharded,
    sum_values,
)
from qalign.errors import TrainingStopped
from qalign.layout import StagePaths
from qalign.logprobs import unwrap
from qalign.metrics import MetricsLog, mean_record
from qalign.offload import ActivationOffload
from qalign.progress import Progress
from qalign.recipe import TrainSpec
from qalign.trackers import Trackers

StepLoss = Callable[[torch.nn.Module, dict, int], tuple[torch.Tensor, dict]]


@dataclass
class Stage:
    """What makes SFT and DPO different; everything else is the loop's."""

    name: str
    spec: TrainSpec
    train: Sequence
    eval: Sequence | None
    collate: Callable[[list], dict[str, torch.Tensor]]
    step_loss: StepLoss
    """(model, micro-batch, step normalizer) -> (loss share, metric shares); the shares of a step's
    micro-batches sum to the step's means."""
    weight: Callable[[object], int]
    """An example's share of the normalizer (trained tokens for SFT)."""
    show: tuple[str, ...] = ("loss",)
    """Metrics shown in the progress bar."""
    summarize: Callable[[dict[str, float]], dict[str, float]] | None = None
    """Turns a step's summed shares into its metrics, for means the normalizer cannot give (KTO's means over
    the desirable rows alone); None: the sums are the metrics."""
    prepare: Callable[[], None] | None = None
    """Work on the model as it will train, run once before the first step (after fsdp has sharded it): DPO's
    reference pass, which would otherwise run on a whole copy of the model in every process."""


def total_steps(spec: TrainSpec, n_examples: int, processes: int = 1) -> tuple[int, int]:
    """(total optimizer steps, steps per epoch); each step takes grad_accum micro-batches on every process."""
    batches = math.ceil(n_examples / spec.batch_size)
    per_epoch = max(1, math.ceil(batches / (spec.grad_accum * processes)))
    return (spec.max_steps or spec.epochs * per_epoch), per_epoch


def lr_factor(spec: TrainSpec, step: int, total: int) -> float:
    """Multiplier on the peak learning rate after `step` optimizer steps: linear warmup, then the schedule."""
    # round() first: 0.07 * 100 is 7.000000000000001, which must not become 8 warmup steps.
    warmup = math.ceil(round(spec.warmup_ratio * total, 9))
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if spec.scheduler == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if spec.scheduler == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class Trainer:
    def __init__(
        self,
        stage: Stage,
        model: torch.nn.Module,
        paths: StagePaths,
        seed: int,
        device: torch.device,
        dtype: torch.dtype,
        progress: Progress,
        fingerprint: dict,
        trackers: Trackers | None = None,
        world: World = SINGLE,
    ) -> None:
        """`fingerprint` ({identity, data_hash}) goes into every checkpoint, for resume to compare against;
        `trackers` (report_to) get every record metrics.jsonl gets. With more than one process (`world`),
        `model` is the DistributedDataParallel wrapper of the decoder and this rank trains its share of each
        step; rank 0 alone writes."""
        self.stage, self.spec, self.world = stage, stage.spec, world
        self.runs = model  # what the step losses call: the model, or the decoder's DDP wrapper
        self.model = unwrap(model)
        self.sharded = world.many and is_sharded(self.model)
        self.paths, self.seed, self.progress = paths, seed, progress
        self.device, self.dtype, self.fingerprint = device, dtype, fingerprint
        self.skipped = 0
        # fp16 has too few exponent bits for small gradients: scale the loss up and skip the steps that overflow.
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        self.total, self.per_epoch = total_steps(self.spec, len(stage.train), world.size)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=self.spec.lr, weight_decay=self.spec.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(self.spec, step, self.total)
        )
        self.checkpoints = CheckpointManager(paths.checkpoints, self.spec.save_total_limit, progress.warn)
        self.metrics = MetricsLog(paths.metrics)
        self.trackers = trackers or Trackers([], paths)
        self.step = 0
        # The stage's totals, carried through checkpoints so a resumed run reports the whole stage.
        self.tokens_seen, self.seconds = 0, 0.0
        self._signal: int | None = None

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    # -- data order ----------------------------------------------------------------------------------------
    def micro_batches(self, step: int) -> list[list]:
        """The micro-batches of optimizer step `step`, over all processes: a pure function of (seed, step), which
        is what makes resume land on exactly the data an uninterrupted run would see. A step's micro-batches
        are the same whatever the process count, only shared out differently (see share)."""
        epoch, within = divmod(step, self.per_epoch)
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.stage.train), generator=generator).tolist()
        size = self.spec.batch_size
        batches = [order[i : i + size] for i in range(0, len(order), size)]
        accum = self.spec.grad_accum * self.world.size
        chosen = batches[within * accum : (within + 1) * accum]
        return [[self.stage.train[i] for i in batch] for batch in chosen]

    def share(self, micro: list[list]) -> list[tuple[list, bool]]:
        """This rank's micro-batches of a step (or of the eval set), each with whether it counts: every rank
        runs as many as the busiest one (each backward, and a sharded forward, is a collective), so a rank short
        of data repeats one with its weight zero."""
        mine = micro[self.world.rank :: self.world.size]
        busiest = math.ceil(len(micro) / self.world.size)
        return [(batch, True) for batch in mine] + [(micro[0], False)] * (busiest - len(mine))

    # -- the loop ------------------------------------------------------------------------------------------
    def fit(self, resume_from: Path | None, recipe_yaml: str) -> dict:
        """Train to the last step (from checkpoint `resume_from` when given); returns the last logged record."""
        if resume_from is not None:
            state = restore_training_state(
                resume_from, self.model, self.optimizer, self.scheduler, self.scaler, self.sharded
            )
            self.step, self.skipped = int(state["step"]), int(state.get("skipped_steps", 0))
            self.tokens_seen, self.seconds = int(state.get("tokens", 0)), float(state.get("seconds", 0.0))
            self.progress.info(f"resuming from {resume_from} (step {self.step} of {self.total})")
        main = self.world.main
        if main:
            self.paths.root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.paths.recipe, recipe_yaml)
            self.metrics.keep_until(self.step)
            self.trackers.open(self.step)
        self.model.train()
        window: list[dict] = []
        last: dict = {}
        shown: dict = {}
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            with self.progress.bar(self.stage.name, self.total, self.step, every=self.spec.log_every) as bar:
                clock = time.perf_counter()
                while self.step < self.total:
                    try:
                        record = self._train_step()
                    except torch.OutOfMemoryError:
                        from qalign.memory_auto import out_of_memory_advice

                        raise TrainingStopped(
                            out_of_memory_advice(self.stage.name, self.spec, self.step + 1), 1
                        ) from None
                    self.step += 1
                    final = self.step == self.total
                    window.append(record)
                    if self.stage.eval and (
                        final or (self.spec.eval_every and self.step % self.spec.eval_every == 0)
                    ):
                        record.update(self.evaluate())
                    if final or self.step % self.spec.log_every == 0 or "eval_loss" in record:
                        last = mean_record(window)
                        if main:
                            self.metrics.append(last)
                            self.trackers.log(last, self.step)
                        window = []
                    shown.update(
                        {k: record[k] for k in (*self.stage.show, "lr", "tokens_per_s") if k in record}
                    )
                    if "eval_loss" in record:
                        shown["eval_loss"] = record["eval_loss"]
                    bar.update(self.step, shown)
                    now = time.perf_counter()
                    self.seconds, clock = self.seconds + now - clock, now
                    saving = final or (self.spec.save_every and self.step % self.spec.save_every == 0)
                    # Every rank stops after the same step, whichever of them the signal reached first.
                    stopping = any_rank(self._signal is not None, self.world)
                    if saving or stopping:
                        self.save_checkpoint()
                    if stopping:
                        name = signal.Signals(self._signal or signal.SIGINT).name
                        raise TrainingStopped(
                            f"{name}: saved a checkpoint at step {self.step}; run the same command to resume",
                            128 + (self._signal or signal.SIGINT),
                        )
        finally:
            if main:
                self.trackers.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return last

    def _train_step(self) -> dict:
        started = time.perf_counter()
        micro = self.micro_batches(self.step)
        # The whole step's weight, all ranks' micro-batches included: the loss is a mean over the global batch.
        norm = sum(self.stage.weight(e) for batch in micro for e in batch)
        sums: dict[str, float] = {}
        tokens = 0
        share = self.share(micro)
        for index, (examples, counts) in enumerate(share):
            batch = {k: v.to(self.device) for k, v in self.stage.collate(examples).items()}
            with self.autocast(), self._sync(index == len(share) - 1), self._offload():
                loss, shares = self.stage.step_loss(self.runs, batch, norm)
                # DistributedDataParallel averages the ranks' gradients; the shares are to be summed.
                loss = loss * (self.world.size if counts else 0.0)
            self.scaler.scale(loss).backward()
            # A repeated micro-batch adds zeros, so that every rank sums the same keys.
            tokens += int(batch["attention_mask"].sum()) if counts else 0
            for key, value in shares.items():
                sums[key] = sums.get(key, 0.0) + (float(value) if counts else 0.0)
        totals = sum_values({**sums, "_tokens": float(tokens)}, self.world)
        tokens = int(totals.pop("_tokens"))
        sums = totals if self.stage.summarize is None else self.stage.summarize(totals)
        self.scaler.unscale_(self.optimizer)
        # max_norm=inf measures without clipping, so non-finite gradients are caught either way.
        limit = self.spec.max_grad_norm if self.spec.max_grad_norm > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, limit))
        lr = self.scheduler.get_last_lr()[0]
        record = {"step": self.step + 1, **sums, "lr": lr}
        problem = None
        if not math.isfinite(sums.get("loss", 0.0)):
            problem = f"the loss is {sums.get('loss')}"
        elif not math.isfinite(grad_norm) and not self.scaler.is_enabled():
            problem = f"the gradient norm is {grad_norm}"
        if problem is not None:
            return self._bad_step(problem, record)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if math.isfinite(grad_norm):
            self.scheduler.step()
        else:
            # Under fp16 loss scaling an overflow is routine: the scaler skipped the update and lowered its
            # scale; the schedule waits for the step that really happens.
            record["scaler_skipped"] = True
        elapsed = time.perf_counter() - started
        self.tokens_seen += tokens
        record["tokens_per_s"] = tokens / max(elapsed, 1e-9)
        record["epoch"] = round((self.step + 1) / self.per_epoch, 4)
        record["grad_norm"] = grad_norm
        if self.skipped:
            record["skipped_steps"] = self.skipped
        return record

    def _offload(self) -> contextlib.AbstractContextManager:
        """What the forward saves for the backward waits in host memory (activation_offloading, on a GPU)."""
        if self.spec.activation_offloading is True and self.device.type == "cuda":
            return ActivationOffload(self.device.type)
        return contextlib.nullcontext()

    def _sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Gradients are averaged over the ranks once per step, in the backward of its last micro-batch."""
        return gradient_sync(self.runs, last) if self.world.many else contextlib.nullcontext()

    def _bad_step(self, problem: str, record: dict) -> dict:
        """A non-finite loss or gradient: stop keeping the last good checkpoint, or skip the step (nan_policy)."""
        if self.spec.nan_policy != "skip":
            latest = self.checkpoints.latest()
            kept = (
                f"the last good checkpoint ({latest.name}) is kept"
                if latest
                else "no checkpoint was saved yet"
            )
            raise TrainingStopped(
                f"step {self.step + 1}: {problem}; stopped without saving, {kept}. Likely causes: a learning "
                "rate too high, fp16 overflow (try compute_dtype: bf16 or fp32), or bad data; "
                f"{self.stage.name}.nan_policy: skip skips such steps instead",
                1,
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.skipped += 1
        self.progress.warn(f"step {self.step + 1}: {problem}; skipped ({self.skipped} so far)")
        return {**record, "skipped": True, "skipped_steps": self.skipped}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The stage's metrics over the whole eval set, each as `eval_<name>`."""
        was_training = self.model.training
        self.model.eval()
        examples = list(self.stage.eval or [])
        norm = sum(self.stage.weight(e) for e in examples)
        sums: dict[str, float] = {}
        size = self.spec.batch_size
        batches = [examples[i : i + size] for i in range(0, len(examples), size)]
        # As in training, every rank runs as many batches as the busiest (a sharded forward is a collective).
        for part, counts in self.share(batches):
            batch = {k: v.to(self.device) for k, v in self.stage.collate(part).items()}
            with self.autocast():
                _, shares = self.stage.step_loss(self.runs, batch, norm)
            for key, value in shares.items():
                sums[key] = sums.get(key, 0.0) + (float(value) if counts else 0.0)
        self.model.train(was_training)
        sums = sum_values(sums, self.world)
        if self.stage.summarize is not None:
            sums = self.stage.summarize(sums)
        return {f"eval_{k}": v for k, v in sums.items()}

    def save_checkpoint(self) -> Path:
        epoch, within = divmod(self.step, self.per_epoch)
        state = {
            "total_steps": self.total,
            "epoch": epoch,
            "step_in_epoch": within,
            **self.fingerprint,
            "skipped_steps": self.skipped,
            "tokens": self.tokens_seen,
            "seconds": self.seconds,
        }
        folder = self.checkpoints.root / f"step-{self.step}"
        # A sharded adapter and optimizer are gathered by every rank together; rank 0 writes them.
        whole = full_states(self.model, self.optimizer) if self.sharded else None
        if self.world.main:
            folder = save_training_state(
                self.checkpoints,
                self.step,
                self.model,
                self.optimizer,
                self.scheduler,
                self.scaler,
                state,
                whole,
            )
        # The others wait, so that no rank runs ahead of a checkpoint that is not complete yet.
        barrier(self.world)
        return folder

    def _on_signal(self, signum: int, frame: object) -> None:
        if self._signal is not None:
            # A second Ctrl-C: leave now; the last complete checkpoint stays usable.
            raise KeyboardInterrupt
        self._signal = signum
        self.progress.warn(f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint")
