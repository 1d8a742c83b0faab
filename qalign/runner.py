"""Running a stage end to end: check the output folder, load data and model, train, save the adapter."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from transformers import set_seed

from qalign import __version__
from qalign.checkpoint import CheckpointManager, atomic_write_text
from qalign.data import DataReport, read_rows
from qalign.errors import UserError
from qalign.host_allocator import keep_freed_buffers
from qalign.lora import tune_lora_layers
from qalign.model import (
    attach_lora,
    compute_dtype,
    count_parameters,
    footprint_bytes,
    load_base,
    load_tokenizer,
    pick_device,
)
from qalign.progress import Progress
from qalign.recipe import Recipe, TrainSpec
from qalign.sft import collate_sft, prepare_sft, sft_step
from qalign.train import Stage, Trainer, total_steps

RUN_MARKER = ".qalign-run"
BOOKKEEPING = {"save_every", "save_total_limit", "eval_every", "log_every", "nan_policy"}


def check_output_dir(recipe: Recipe) -> None:
    """Refuse to write into a folder that holds something other than a qalign run."""
    out = recipe.out
    if out.exists() and not out.is_dir():
        raise UserError(f"{recipe.source}: output_dir {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / RUN_MARKER).exists():
        raise UserError(
            f"{recipe.source}: output_dir {out} already holds files that are not a qalign run; "
            "choose another output_dir"
        )
    out.mkdir(parents=True, exist_ok=True)
    if not (out / RUN_MARKER).exists():
        atomic_write_text(out / RUN_MARKER, json.dumps({"qalign": __version__, "name": recipe.name}) + "\n")


def examples_hash(examples: list) -> str:
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps(example.__dict__ | {"reference": None, "where": None}).encode())
    return digest.hexdigest()[:16]


def describe_report(report: DataReport) -> str:
    p = report.percentiles()
    lengths = ", ".join(f"{k} {v}" for k, v in p.items())
    return (
        f"{report.source}: {report.kept} of {report.rows} rows kept, "
        f"{report.trained_tokens:,} trained tokens; lengths {lengths}"
    )


def load_stage_data(
    recipe: Recipe, name: str, tokenizer: object, progress: Progress
) -> tuple[list, list | None]:
    """(train examples, eval examples or None) for the recipe's `name` stage, every row checked."""
    spec: TrainSpec = getattr(recipe, name)
    if spec is None:
        raise UserError(f"{recipe.source}: the recipe has no '{name}' section")

    def prepare(source: str, split: str) -> tuple[list, DataReport]:
        rows = read_rows(source, split)
        if name == "sft":
            return prepare_sft(rows, spec.data.format, tokenizer, spec.max_length, spec.overlong, source)
        from qalign.dpo import prepare_dpo

        return prepare_dpo(rows, tokenizer, spec.max_length, spec.overlong, source)

    from qalign.chat_template import describe_template

    progress.info(describe_template(tokenizer))
    train, report = prepare(spec.data.train, spec.data.train_split)
    reports = [report]
    evals = None
    if spec.data.eval is not None:
        evals, eval_report = prepare(spec.data.eval, spec.data.eval_split)
        reports.append(eval_report)
    for item in reports:
        progress.info(describe_report(item))
        for line in item.warnings(name):
            progress.warn(line)
    if not train:
        raise UserError(
            f"{spec.data.train}: every row is longer than {name}.max_length={spec.max_length}; "
            f"raise it or set {name}.overlong: truncate"
        )
    return train, evals


class StageRun:
    """What every stage does around its own data and loss: output checks, seeding, model loading, training,
    and the finished adapter."""

    def __init__(
        self,
        recipe: Recipe,
        name: str,
        progress: Progress,
        resume: bool,
        overwrite: bool,
        force_resume: bool = False,
    ) -> None:
        self.recipe, self.name, self.progress = recipe, name, progress
        self.resume, self.overwrite, self.force_resume = resume, overwrite, force_resume
        self.spec: TrainSpec = getattr(recipe, name)
        if self.spec is None:
            raise UserError(f"{recipe.source}: the recipe has no '{name}' section")
        check_output_dir(recipe)
        self.dir = recipe.out / name
        self.adapter_dir = self.dir / "adapter"
        if not resume:
            _start_over(self.dir)
        self.tokenizer = load_tokenizer(recipe.model, progress.warn)

    def already_done(self, n_train: int) -> bool:
        """True when a finished adapter from this very run exists; an error when one exists otherwise."""
        if not self.adapter_dir.exists() or self.overwrite:
            return False
        if self.resume and _finished(self.dir, total_steps(self.spec, n_train)[0]):
            self.progress.info(
                f"{self.name} is already complete: {self.adapter_dir} (pass --no-resume --overwrite to train again)"
            )
            return True
        raise UserError(
            f"{self.adapter_dir} already holds a finished adapter; pass --overwrite to replace it"
        )

    def plan_memory(self, examples: list) -> None:
        """Resolve `auto` memory settings against the free memory, and print the plan's total. On resume, an
        `auto` takes the value the checkpoint was trained with, so the run continues exactly as it started."""
        from qalign import memory, model_shapes

        device = pick_device()
        spec, earlier = self.spec, self._checkpointed_section()
        self.plan_total: int | None = None
        try:
            config, source = model_shapes.load_config(self.recipe.model)
            arch = model_shapes.describe(config, self.recipe.model, source)
        except (UserError, ValueError, ImportError) as exc:
            # Training can still go ahead without a plan; `auto` then takes the schema's defaults.
            self.progress.warn(f"no memory plan: {exc}")
            if spec.gradient_checkpointing == "auto":
                spec.gradient_checkpointing = earlier.get("gradient_checkpointing", True)
            if spec.batch_size == "auto":
                spec.batch_size = earlier.get("batch_size", 4)
            return
        lengths = memory.lengths_of(examples, self.name)
        if device.type == "cuda":
            # mem_get_info creates the CUDA context, so what it reports free is already net of it.
            free = torch.cuda.mem_get_info()[0] + memory.CUDA_CONTEXT
        else:
            free = memory.available_ram()
        resolved = memory.resolve_auto(arch, self.recipe, self.name, lengths, device.type, free, earlier)
        plan = memory.estimate(arch, self.recipe, self.name, lengths, device.type, free)
        self.plan_total = plan.total_bytes
        where = "free GPU memory" if device.type == "cuda" else "available RAM"
        if resolved:
            self.progress.info(f"{'; '.join(resolved)} (memory planner, {free / 2**30:.1f} GiB {where})")
        self.progress.info(
            f"plan: {plan.total_bytes / 2**30:.2f} GiB predicted for {device.type} "
            f"({where}: {free / 2**30:.1f} GiB; qalign plan shows the breakdown)"
        )
        if plan.fits is False:
            self.progress.warn(
                f"the plan ({plan.total_bytes / 2**30:.2f} GiB) exceeds the {where} ({free / 2**30:.1f} GiB); "
                f"run qalign plan {self.recipe.source} --stage {self.name} for overrides that fit"
            )

    def _checkpointed_section(self) -> dict:
        """This stage's settings as the latest checkpoint recorded them (empty when starting fresh)."""
        if not self.resume:
            return {}
        latest = CheckpointManager(self.dir / "checkpoints").latest()
        if latest is None:
            return {}
        return CheckpointManager.read_state(latest).get("identity", {}).get(self.name, {})

    def load_model(self, init_adapter: Path | None = None) -> torch.nn.Module:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        # Seeded before the adapter exists: LoRA's initial weights come from the global RNG.
        set_seed(self.recipe.seed)
        self.device = pick_device()
        if self.device.type == "cpu":
            keep_freed_buffers()
        self.dtype = compute_dtype(self.recipe.model.compute_dtype, self.device)
        base = load_base(self.recipe.model, self.device)
        self.progress.info(
            f"base {self.recipe.model.base}: {footprint_bytes(base) / 2**20:,.1f} MiB in memory "
            f"({self.recipe.model.quantization}, compute {str(self.dtype).removeprefix('torch.')}, "
            f"{self.device.type})"
        )
        model = attach_lora(base, self.recipe.lora, self.spec.gradient_checkpointing, init_adapter)
        tune_lora_layers(model, self.dtype)
        trainable, total = count_parameters(model)
        source = f"from {init_adapter}" if init_adapter else f"r={self.recipe.lora.r}"
        self.progress.info(
            f"LoRA {source}: {trainable:,} trainable of {total:,} parameters ({trainable / total:.3%})"
        )
        return model

    def identity(self) -> dict:
        """The settings a checkpoint must share with the recipe to resume exactly (not where or how often
        things are saved, evaluated or logged)."""
        dumped = self.recipe.model_dump(mode="json")
        section = {k: v for k, v in dumped[self.name].items() if k not in BOOKKEEPING}
        section["data"] = {k: v for k, v in section["data"].items() if not k.startswith("eval")}
        model = dict(dumped["model"])
        # `auto` resolves per machine (bf16 on a CPU with native bf16, fp32 on another): a resume elsewhere must
        # not silently continue in another precision.
        model["resolved_compute_dtype"] = str(self.dtype).removeprefix("torch.")
        return {"seed": dumped["seed"], "model": model, "lora": dumped["lora"], self.name: section}

    def train(self, stage: Stage, model: torch.nn.Module) -> Path:
        precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "no")
        trainer = Trainer(
            stage,
            model,
            self.tokenizer,
            self.dir,
            self.recipe.seed,
            precision,
            self.progress,
            self.recipe.to_yaml(),
            identity=self.identity(),
            force_resume=self.force_resume,
        )
        trainer.fit(self.resume)
        metadata = {
            "qalign": __version__,
            "stage": self.name,
            "base": self.recipe.model.base,
            "revision": self.recipe.model.revision,
            "quantization": self.recipe.model.quantization,
            "double_quant": self.recipe.model.double_quant,
            "compute_dtype": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32"),
            "trust_remote_code": self.recipe.model.trust_remote_code,
        }
        trainer.save_adapter(self.adapter_dir, overwrite=True, metadata=metadata)
        peak, kind = measured_peak()
        trainer.log_final(
            {
                "adapter": str(self.adapter_dir),
                "plan_total_bytes": getattr(self, "plan_total", None),
                "peak_memory_bytes": peak,
                "peak_memory_kind": kind,
            }
        )
        what = (
            "CUDA memory allocated by tensors"
            if kind == "cuda_max_allocated"
            else "peak RSS of the whole process (Python and libraries included; the plan counts tensors)"
        )
        planned = getattr(self, "plan_total", None)
        versus = f" (plan: {planned / 2**30:.2f} GiB)" if planned else ""
        self.progress.info(f"measured peak: {peak / 2**30:.2f} GiB, {what}{versus}")
        self.progress.info(f"adapter saved to {self.adapter_dir}")
        return self.adapter_dir


def measured_peak() -> tuple[int, str]:
    """(bytes, kind): the CUDA allocator's peak on a GPU; on a CPU the process's peak resident set size."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
    import resource

    # Linux reports ru_maxrss in KiB.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "cpu_peak_rss"


def run_sft(
    recipe: Recipe,
    progress: Progress,
    resume: bool = True,
    overwrite: bool = False,
    force_resume: bool = False,
) -> Path:
    """`qalign sft`: returns the adapter folder."""
    run = StageRun(recipe, "sft", progress, resume, overwrite, force_resume)
    train, evals = load_stage_data(recipe, "sft", run.tokenizer, progress)
    run.plan_memory(train)
    if run.already_done(len(train)):
        return run.adapter_dir
    model = run.load_model()
    pad_id = run.tokenizer.pad_token_id
    stage = Stage(
        name="sft",
        spec=run.spec,
        train=train,
        eval=evals,
        collate=lambda examples: collate_sft(examples, pad_id),
        step_loss=sft_step,
        weight=lambda example: example.weight,
        data_hash=examples_hash(train) + examples_hash(evals or []),
    )
    return run.train(stage, model)


def find_adapter(recipe: Recipe, stage: str | None, hint: str = "train first (qalign run)") -> Path:
    """The adapter of `stage`, or of the last stage that has one (dpo, then sft)."""
    for name in [stage] if stage else ["dpo", "sft"]:
        adapter = recipe.out / name / "adapter"
        if (adapter / "adapter_config.json").exists():
            return adapter
    which = f"the {stage} stage" if stage else "any stage"
    raise UserError(f"{recipe.source}: no adapter from {which} in {recipe.out}; {hint}")


def _finished(stage_dir: Path, total: int) -> bool:
    latest = CheckpointManager(stage_dir / "checkpoints").latest()
    return latest is not None and CheckpointManager.read_state(latest).get("step") == total


def _start_over(stage_dir: Path) -> None:
    """--no-resume: forget checkpoints and metrics of the earlier attempt (never the finished adapter)."""
    for name in ("checkpoints", "metrics.jsonl"):
        path = stage_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def run_dpo(
    recipe: Recipe,
    progress: Progress,
    resume: bool = True,
    overwrite: bool = False,
    force_resume: bool = False,
) -> Path:
    """`qalign dpo`: starts from the SFT adapter when there is one; the frozen start is the reference."""
    from qalign.dpo import collate_dpo, make_dpo_step
    from qalign.reference import adapter_digest, attach_reference, cache_key

    run = StageRun(recipe, "dpo", progress, resume, overwrite, force_resume)
    spec = run.spec
    train, evals = load_stage_data(recipe, "dpo", run.tokenizer, progress)
    run.plan_memory(train)
    if run.already_done(len(train)):
        return run.adapter_dir
    init = starting_adapter(recipe)
    model = run.load_model(init)
    reference_adapter = None
    if spec.reference == "live" and init is not None:
        # A frozen copy of the starting adapter, beside the trainable one; the base is loaded once.
        model.load_adapter(str(init), adapter_name="reference", is_trainable=False)
        reference_adapter = "reference"
    disable_dropout(model)
    pad_id = run.tokenizer.pad_token_id
    if spec.reference == "precompute":
        start = {
            "base": recipe.model.base,
            "revision": recipe.model.revision,
            "quantization": recipe.model.quantization,
            "double_quant": recipe.model.double_quant,
            "dtype": str(run.dtype),
            "adapter": adapter_digest(init),
        }
        for label, examples in (("train", train), ("eval", evals)):
            if examples:
                cache = (
                    run.dir / "reference" / f"{label}-{cache_key(examples_hash(examples), start)}.safetensors"
                )
                attach_reference(model, examples, cache, spec.batch_size, pad_id, run.device, progress, label)
    stage = Stage(
        name="dpo",
        spec=spec,
        train=train,
        eval=evals,
        collate=lambda examples: collate_dpo(examples, pad_id),
        step_loss=make_dpo_step(spec, reference_adapter),
        weight=lambda example: 1,
        data_hash=examples_hash(train) + examples_hash(evals or []) + str(adapter_digest(init)),
        show=("loss", "rewards/margin", "rewards/accuracy"),
    )
    return run.train(stage, model)


def starting_adapter(recipe: Recipe) -> Path | None:
    """dpo.init_adapter, else the SFT stage's finished adapter, else none (a fresh adapter on the base)."""
    assert recipe.dpo is not None
    if recipe.dpo.init_adapter is not None:
        return Path(recipe.dpo.init_adapter)
    sft_adapter = recipe.out / "sft" / "adapter"
    return sft_adapter if (sft_adapter / "adapter_config.json").exists() else None


def disable_dropout(model: torch.nn.Module) -> None:
    """DPO compares the policy with its own frozen start: with dropout on, the two differ at step 0 by noise,
    and the loss no longer starts at log 2."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
