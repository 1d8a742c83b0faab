"""The TRL side of a measurement: the 4-bit base loaded as a TRL user would (transformers + bitsandbytes), a peft
LoRA config handed to SFTTrainer/DPOTrainer, the same data and workload, a clock on each optimizer step."""

from __future__ import annotations

import argparse
import json
import time

import torch
from bench_worker import LORA, StepClock, trl_settings


def conversational(stage: str, row: dict) -> dict:
    """The rows qalign reads, in the conversational layout TRL renders through the same chat template."""
    if stage == "sft":
        user, assistant = row["messages"]
        return {"prompt": [user], "completion": [assistant]}
    return {
        "prompt": [{"role": "user", "content": row["prompt"]}],
        "chosen": [{"role": "assistant", "content": row["chosen"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]}],
    }


def keep_training_layout(model: torch.nn.Module) -> None:
    """Without this TRL cannot precompute reference log-probs on a CPU: bitsandbytes repacks 4-bit weights for a
    CPU inference kernel the first time a layer runs in eval mode, and the repacked weights then fail (or are
    wrong) in training. qalign's loader does the same (model.py); it changes nothing on a GPU."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_model(args: argparse.Namespace, dtype: torch.dtype, cuda: bool) -> torch.nn.Module:
    """The 4-bit base as a TRL user loads it (transformers + bitsandbytes)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(
        args.model,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        ),
        dtype=dtype,
        device_map={"": 0 if cuda else "cpu"},
    )
    keep_training_layout(model)
    return model


def run_trl(args: argparse.Namespace, clock: StepClock) -> dict:
    with clock.phase("trl imports"):
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import AutoTokenizer, TrainerCallback
        from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

        from qalign.model import compute_dtype

    with clock.phase("data (read)"):
        lines = (args.data / f"{args.stage}.jsonl").read_text(encoding="utf-8").splitlines()
        dataset = Dataset.from_list([conversational(args.stage, json.loads(line)) for line in lines])
    with clock.phase("tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    cuda = torch.cuda.is_available()
    # The compute dtype qalign picks: bf16 on a GPU or a CPU that has it, else fp32.
    dtype = compute_dtype("auto", torch.device("cuda" if cuda else "cpu"))
    with clock.phase("model (load, quantize)"):
        model = load_model(args, dtype, cuda)
    peft_config = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules="all-linear",
        bias="none",
        task_type="CAUSAL_LM",
    )
    chosen = trl_settings(args.stage, args.mode)
    common = dict(
        output_dir=str(args.workdir / "run"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        # The compute dtype is part of the workload, not a setting being compared: both tools run in the one
        # qalign's `auto` picks (bf16 on a GPU or a CPU with native bf16, else fp32). TRL's own default is bf16
        # autocast, which on a CPU needs use_cpu.
        bf16=dtype == torch.bfloat16,
        fp16=False,
        # transformers refuses bf16 without a GPU unless told the CPU is meant.
        use_cpu=not cuda,
        # TRL will not combine padding_free with a max_length it cannot enforce without packing; the data is
        # generated within --max-length, so dropping it truncates nothing.
        max_length=None if chosen.get("padding_free") and args.stage == "sft" else args.max_length,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
        **chosen,
    )
    config = SFTConfig(**common) if args.stage == "sft" else DPOConfig(**common)
    trainer_class = SFTTrainer if args.stage == "sft" else DPOTrainer

    class Counted(trainer_class):
        def training_step(self, model, inputs, *rest, **kw):
            clock.training_begins()
            mask = inputs.get("attention_mask")
            clock.pending += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
            return super().training_step(model, inputs, *rest, **kw)

        def _precompute_ref_logps(self, *a, **k):
            began = time.perf_counter()
            try:
                return super()._precompute_ref_logps(*a, **k)
            finally:
                clock.precompute_s += time.perf_counter() - began

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            clock.step_done()

    with clock.phase("trainer setup (LoRA, tokenizing)"):
        trainer = Counted(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[Clock()],
        )
    # DPOTrainer makes its reference pass while it is built; that is timed on its own (precompute_s).
    clock.phases["trainer setup (LoRA, tokenizing)"] -= clock.precompute_s
    if args.trl_adapters == "compute":
        # TRL casts a quantized model's adapters to bf16 whatever the compute dtype (the QLoRA paper's recipe).
        # Where that dtype is fp32 (a CPU without native bf16) this undoes the cast, to show what it costs.
        for parameter in trainer.model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.to(dtype)
    trainer.train()
    adapter_dtypes = {
        str(p.dtype).removeprefix("torch.") for p in trainer.model.parameters() if p.requires_grad
    }
    settings = {
        "gradient_checkpointing": config.gradient_checkpointing,
        "bf16": config.bf16,
        "compute_dtype": str(dtype).removeprefix("torch."),
        # What the trainer runs with: TRL 1.16's DPOTrainer turns the config's padding_free back off.
        "padding_free": getattr(trainer, "padding_free", config.padding_free),
        "optim": config.optim,
        "lora_dropout": LORA["dropout"],
        "adapter_dtype": ",".join(sorted(adapter_dtypes)),
    }
    if args.stage == "sft":
        settings.update(packing=config.packing, loss_type=config.loss_type)
    else:
        settings.update(
            precompute_ref_log_probs=config.precompute_ref_log_probs,
            disable_dropout=config.disable_dropout,
            loss_type=config.loss_type,
        )
    return settings
