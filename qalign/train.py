"""The one training loop every stage shares. A stage supplies its examples, a collate and a step loss;
the loop owns order, accumulation, optimizer, schedule, checkpoints, resume, evaluation and logging."""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from qalign.checkpoint import (
    CheckpointManager,
    atomic_dir,
    atomic_write_text,
    capture_rng_state,
    load_torch,
    restore_rng_state,
    save_torch,
)
from qalign.errors import UserError
from qalign.progress import Progress
from qalign.recipe import TrainSpec

StepLoss = Callable[[torch.nn.Module, dict, int], tuple[torch.Tensor, dict]]


class TrainingStopped(Exception):
    """The run stopped before the end on purpose (a signal, a non-finite loss); `code` is the exit status."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


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
    data_hash: str = ""
    show: tuple[str, ...] = ("loss",)
    """Metrics shown in the progress bar."""
    extra_state: dict = field(default_factory=dict)


def total_steps(spec: TrainSpec, n_examples: int) -> tuple[int, int]:
    """(total optimizer steps, steps per epoch)."""
    batches = math.ceil(n_examples / spec.batch_size)
    per_epoch = max(1, math.ceil(batches / spec.grad_accum))
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
        tokenizer: PreTrainedTokenizerBase,
        run_dir: Path,
        seed: int,
        mixed_precision: str,
        progress: Progress,
        recipe_yaml: str,
        identity: dict | None = None,
        force_resume: bool = False,
    ) -> None:
        self.stage, self.spec, self.model, self.tokenizer = stage, stage.spec, model, tokenizer
        self.run_dir, self.seed, self.progress = run_dir, seed, progress
        self.recipe_yaml = recipe_yaml
        # What must not change between a checkpoint and its resume for the result to stay exact.
        self.identity = identity or {}
        self.force_resume = force_resume
        self.skipped = 0
        self.accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())
        self.device = self.accelerator.device
        self.total, self.per_epoch = total_steps(self.spec, len(stage.train))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.spec.lr, weight_decay=self.spec.weight_decay)
        self.optimizer = self.accelerator.prepare_optimizer(optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(self.spec, step, self.total)
        )
        self.checkpoints = CheckpointManager(
            run_dir / "checkpoints", self.spec.save_total_limit, progress.warn
        )
        self.metrics_path = run_dir / "metrics.jsonl"
        self.step = 0
        self._signal: int | None = None

    # -- data order ----------------------------------------------------------------------------------------
    def micro_batches(self, step: int) -> list[list]:
        """The micro-batches of optimizer step `step`: a pure function of (seed, step), which is what makes
        resume land on exactly the data an uninterrupted run would see."""
        epoch, within = divmod(step, self.per_epoch)
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.stage.train), generator=generator).tolist()
        size = self.spec.batch_size
        batches = [order[i : i + size] for i in range(0, len(order), size)]
        chosen = batches[within * self.spec.grad_accum : (within + 1) * self.spec.grad_accum]
        return [[self.stage.train[i] for i in batch] for batch in chosen]

    # -- the loop ------------------------------------------------------------------------------------------
    def fit(self, resume: bool) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self._resume()
        # Only after the resume check: a refused resume leaves the run's files as they were.
        atomic_write_text(self.run_dir / "recipe.yaml", self.recipe_yaml)
        self._truncate_metrics()
        self.model.train()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            with self.progress.bar(self.stage.name, self.total, self.step) as bar:
                while self.step < self.total:
                    try:
                        record = self._train_step()
                    except torch.OutOfMemoryError:
                        raise TrainingStopped(self._out_of_memory(), 1) from None
                    self.step += 1
                    final = self.step == self.total
                    if self.stage.eval and (
                        final or (self.spec.eval_every and self.step % self.spec.eval_every == 0)
                    ):
                        record.update(self.evaluate())
                    if final or self.step % self.spec.log_every == 0 or "eval_loss" in record:
                        self._log(record)
                    bar.update(
                        self.step,
                        {k: record[k] for k in (*self.stage.show, "lr", "tokens_per_s") if k in record},
                    )
                    if final or (self.spec.save_every and self.step % self.spec.save_every == 0):
                        self.save_checkpoint()
                    if self._signal is not None:
                        if not (self.spec.save_every and self.step % self.spec.save_every == 0) and not final:
                            self.save_checkpoint()
                        name = signal.Signals(self._signal).name
                        raise TrainingStopped(
                            f"{name}: saved a checkpoint at step {self.step}; run the same command to resume",
                            128 + self._signal,
                        )
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _train_step(self) -> dict:
        started = time.perf_counter()
        micro = self.micro_batches(self.step)
        norm = sum(self.stage.weight(e) for batch in micro for e in batch)
        sums: dict[str, float] = {}
        tokens = 0
        for examples in micro:
            batch = {k: v.to(self.device) for k, v in self.stage.collate(examples).items()}
            tokens += int(batch["attention_mask"].sum())
            with self.accelerator.autocast():
                loss, shares = self.stage.step_loss(self.model, batch, norm)
            self.accelerator.backward(loss)
            for key, value in shares.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        params = [p for p in self.model.parameters() if p.requires_grad]
        # max_norm=inf measures without clipping, so non-finite gradients are caught either way.
        limit = self.spec.max_grad_norm if self.spec.max_grad_norm > 0 else math.inf
        grad_norm = float(self.accelerator.clip_grad_norm_(params, limit))
        lr = self.scheduler.get_last_lr()[0]
        record = {"step": self.step + 1, **sums, "lr": lr}
        # Under fp16 loss scaling an inf gradient is routine: the scaler skips that step itself.
        scaled = getattr(self.accelerator, "scaler", None) is not None
        problem = None
        if not math.isfinite(sums.get("loss", 0.0)):
            problem = f"the loss is {sums.get('loss')}"
        elif not math.isfinite(grad_norm) and not scaled:
            problem = f"the gradient norm is {grad_norm}"
        if problem is not None:
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
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        record["tokens_per_s"] = tokens / max(elapsed, 1e-9)
        record["epoch"] = round((self.step + 1) / self.per_epoch, 4)
        record["grad_norm"] = grad_norm
        if self.skipped:
            record["skipped_steps"] = self.skipped
        return record

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The stage's metrics over the whole eval set, each as `eval_<name>`."""
        was_training = self.model.training
        self.model.eval()
        examples = list(self.stage.eval or [])
        norm = sum(self.stage.weight(e) for e in examples)
        sums: dict[str, float] = {}
        size = self.spec.batch_size
        for i in range(0, len(examples), size):
            batch = {k: v.to(self.device) for k, v in self.stage.collate(examples[i : i + size]).items()}
            with self.accelerator.autocast():
                _, shares = self.stage.step_loss(self.model, batch, norm)
            for key, value in shares.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        self.model.train(was_training)
        return {f"eval_{k}": v for k, v in sums.items()}

    def _out_of_memory(self) -> str:
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        total = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 0.0
        name, spec = self.stage.name, self.spec
        fixes = []
        if not spec.gradient_checkpointing:
            fixes.append(f"--set {name}.gradient_checkpointing=true")
        if spec.batch_size > 1:
            fixes.append(
                f"--set {name}.batch_size={spec.batch_size // 2} --set {name}.grad_accum={spec.grad_accum * 2} "
                "(same effective batch)"
            )
        fixes.append(f"--set {name}.max_length={max(64, spec.max_length // 2)}")
        return (
            f"out of GPU memory at step {self.step + 1} (peak {peak:.1f} GiB allocated of {total:.1f} GiB); "
            f"the last checkpoint is kept. Try: {'; or '.join(fixes)}"
        )

    # -- checkpoints -------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        def write(folder: Path) -> None:
            # Only the trained adapter: DPO's live reference is a frozen copy of the starting one.
            self.model.save_pretrained(str(folder), selected_adapters=["default"])
            save_torch(self.optimizer.state_dict(), folder / "optimizer.pt")
            save_torch(self.scheduler.state_dict(), folder / "scheduler.pt")
            save_torch(capture_rng_state(), folder / "rng.pt")
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None:
                save_torch(scaler.state_dict(), folder / "scaler.pt")

        epoch, within = divmod(self.step, self.per_epoch)
        state = {
            "total_steps": self.total,
            "epoch": epoch,
            "step_in_epoch": within,
            "identity": self.identity,
            "data_hash": self.stage.data_hash,
            "skipped_steps": self.skipped,
            **self.stage.extra_state,
        }
        return self.checkpoints.save(self.step, write, state)

    def _resume(self) -> None:
        latest = self.checkpoints.latest()
        if latest is None:
            return
        state = CheckpointManager.read_state(latest)
        changes = _differences(state.get("identity", {}), self.identity)
        if state.get("data_hash") != self.stage.data_hash:
            changes.append("the training data (or its tokenization)")
        if changes and not self.force_resume:
            raise UserError(
                f"{latest}: changed since this checkpoint: {'; '.join(changes[:4])}. Resuming would not reproduce "
                "an uninterrupted run: pass --force-resume to continue anyway, or --no-resume to start over"
            )
        if changes:
            self.progress.warn(f"resuming despite changes (--force-resume): {'; '.join(changes[:4])}")
        weights = load_file(str(latest / "adapter_model.safetensors"))
        set_peft_model_state_dict(self.model, weights)
        self.optimizer.load_state_dict(load_torch(latest / "optimizer.pt"))
        self.scheduler.load_state_dict(load_torch(latest / "scheduler.pt"))
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and (latest / "scaler.pt").exists():
            scaler.load_state_dict(load_torch(latest / "scaler.pt"))
        restore_rng_state(load_torch(latest / "rng.pt"))
        self.step = int(state["step"])
        self.skipped = int(state.get("skipped_steps", 0))
        self.progress.info(f"resuming from {latest} (step {self.step} of {self.total})")

    # -- outputs -------------------------------------------------------------------------------------------
    def _truncate_metrics(self) -> None:
        """Drop records past the resumed step, so the file reads as one uninterrupted run."""
        if not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash mid-write
            if isinstance(record, dict) and record.get("step", 0) <= self.step and "final" not in record:
                kept.append(line)
        atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))

    def _log(self, record: dict) -> None:
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def log_final(self, record: dict) -> None:
        self._log({"step": self.step, "final": True, **record})

    def save_adapter(self, target: Path, overwrite: bool, metadata: dict) -> None:
        """The finished adapter (peft format plus tokenizer, and `qalign.json`: how the base was loaded, which
        merge and chat need to rebuild what training saw), written atomically."""
        with atomic_dir(target, replace=overwrite or target.exists()) as folder:
            self.model.save_pretrained(str(folder), selected_adapters=["default"])
            self.tokenizer.save_pretrained(str(folder))
            (folder / "qalign.json").write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")

    def _on_signal(self, signum: int, frame: object) -> None:
        if self._signal is not None:
            # A second Ctrl-C: leave now; the last complete checkpoint stays usable.
            raise KeyboardInterrupt
        self._signal = signum
        self.progress.warn(f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint")


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable `key: old -> new` for every leaf that differs between two nested dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(_differences(a, b, f"{prefix}{key}."))
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out
