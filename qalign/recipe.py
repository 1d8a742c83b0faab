"""The recipe's schema: one YAML file, validated by these typed sections, drives every stage. Each field's
description is its documentation (the README's key reference is generated from it); reading a file, its errors
and `--set` are recipe_load.py's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# Every key carries its description in Field(description=...): `qalign init` and the README's key reference
# are generated from these, so they must say what the code that reads each key does.


class ModelSpec(_Section):
    """The frozen base model and how it is loaded."""

    base: str = Field(
        description="Hub id (e.g. `Qwen/Qwen2.5-0.5B-Instruct`) or a local folder, relative to the recipe."
    )
    revision: str | None = Field(None, description="Hub branch, tag or commit; ignored for local folders.")
    quantization: Literal["nf4", "fp4", "none"] = Field(
        "nf4",
        description="How the frozen base weights are stored: 4-bit NF4 (the QLoRA choice) or FP4 through "
        "bitsandbytes, or none (unquantized, in the compute dtype).",
    )
    double_quant: bool = Field(
        True, description="Quantize the 4-bit scales too (about 0.4 bit/parameter saved); 4-bit only."
    )
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="Precision of the math. auto: bf16 on GPUs that support it, else fp16; on a CPU, bf16 "
        "where it multiplies bf16 natively (AVX512-BF16 or AMX: about 1.7x faster than fp32 there), else fp32.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Run Python code shipped with a hub model (custom architectures); only for models you trust.",
    )
    allow_pickle: bool = Field(
        False,
        description="Load .bin/.pt weights when there are no safetensors (pickle can run code; only for files "
        "you trust).",
    )
    chat_template: str | None = Field(
        None,
        description="Path to a .jinja file (relative to the recipe) replacing the tokenizer's chat template; "
        "null keeps the model's own (ChatML, with a warning, when it has none).",
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(
        None, description="Attention kernel; null lets transformers choose (sdpa where supported)."
    )


class LoraSpec(_Section):
    """The LoRA adapter trained on the frozen base (the same settings for every stage)."""

    r: int = Field(16, gt=0, description="Adapter rank: trainable parameters and their memory grow with it.")
    alpha: float = Field(
        32.0,
        gt=0,
        allow_inf_nan=False,
        description="Scaling numerator: the adapter's update is scaled by alpha / r.",
    )
    dropout: float = Field(
        0.05,
        ge=0,
        lt=1,
        allow_inf_nan=False,
        description="Dropout on the adapter's input in SFT (DPO turns all dropout off, so that the policy "
        "starts equal to its reference).",
    )
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear",
        description="Layers that get an adapter. all-linear: every linear layer of the decoder except the LM "
        "head, resolved per architecture; or a list of module names (e.g. [q_proj, v_proj]).",
    )

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("must name at least one module, or be 'all-linear'")
        return value


class DataSpec(_Section):
    """Where a stage's rows come from."""

    train: str = Field(
        description="Local .jsonl/.json/.parquet/.csv file (relative to the recipe) or a hub dataset id."
    )
    eval: str | None = Field(
        None,
        description="Held-out data in the same forms as train, evaluated every eval_every steps and at the "
        "end; null: no evaluation.",
    )
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "hh_rlhf"] = Field(
        "auto",
        description="Row format; auto picks it from the first row's keys. hh_rlhf: the `chosen` text of an "
        "HH-RLHF pair (turns marked `Human:` / `Assistant:`), every Assistant turn trained.",
    )
    train_split: str = Field("train", description="Split to read when `train` is a hub dataset id.")
    eval_split: str = Field("test", description="Split to read when `eval` is a hub dataset id.")
    columns: dict[str, str] = Field(
        {},
        description="The dataset's own column names for the fields the format reads, as field: column, e.g. "
        "`{instruction: q, output: a}` or `{messages: conversation}`; applied to train and eval rows before "
        "the format is picked. Only top-level columns are mapped (not the role/content or from/value keys "
        "inside a conversation); the mapped column is read instead of any column already named like the "
        "field (said at the start), and no two fields may read one column. Fields: messages, conversations, "
        "system, instruction, input, output, prompt, completion, chosen, tools.",
    )

    # The fields `columns` may map: those the stage's formats read.
    FIELDS: ClassVar[tuple[str, ...]] = (
        "messages", "conversations", "system", "instruction", "input", "output", "prompt", "completion",
        "chosen", "tools",
    )  # fmt: skip

    @field_validator("columns")
    @classmethod
    def _known_fields(cls, value: dict[str, str]) -> dict[str, str]:
        from qalign.columns import mapping_problem

        problem = mapping_problem(value, cls.FIELDS)
        if problem:
            raise PydanticCustomError("columns", problem)
        return value


_POSITIVE_INT = TypeAdapter(Annotated[int, Field(gt=0)])
_BOOL = TypeAdapter(bool)
_BETA = TypeAdapter(Annotated[float, Field(gt=0, allow_inf_nan=False)])
# beta: auto's values. DPO's paper and ORPO's (as its lambda) use 0.1; SimPO's needs a far larger one.
DPO_BETA, SIMPO_BETA = 0.1, 2.0
REFERENCE_FREE = ("simpo", "orpo")


class TrainSpec(_Section):
    """Settings shared by every training stage."""

    data: DataSpec = Field(description="Where the training (and eval) rows come from.")
    max_length: int = Field(
        1024, gt=0, description="Tokens per example, prompt included (DPO: the prompt and the longer reply)."
    )
    overlong: Literal["drop", "truncate"] = Field(
        "drop",
        description="What to do with examples longer than max_length: drop them (counted and reported) or "
        "cut them.",
    )
    epochs: int = Field(1, gt=0, description="Passes over the training data, unless max_steps is set.")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides epochs when set.")
    batch_size: int | Literal["auto"] = Field(
        4,
        description="Examples (DPO: pairs) per micro-batch; auto: the largest power of two (up to 64 on a GPU, "
        "8 on a CPU) that the memory planner fits in the free memory at start.",
    )
    grad_accum: int = Field(
        1,
        gt=0,
        description="Micro-batches per optimizer step: the effective batch is batch_size * grad_accum.",
    )
    lr: float = Field(
        2.0e-4, gt=0, allow_inf_nan=False, description="Peak learning rate of AdamW, reached after warmup."
    )
    weight_decay: float = Field(
        0.0, ge=0, allow_inf_nan=False, description="AdamW weight decay on the adapter's weights."
    )
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning rate after warmup: cosine or linear decay to 0, or constant."
    )
    warmup_ratio: float = Field(
        0.03,
        ge=0,
        lt=1,
        allow_inf_nan=False,
        description="Fraction of the optimizer steps over which the learning rate rises linearly to lr.",
    )
    max_grad_norm: float = Field(
        1.0, ge=0, allow_inf_nan=False, description="Gradient clipping norm; 0 turns clipping off."
    )
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto",
        description="Recompute activations in the backward pass: much less memory for about a third more "
        "compute; auto: off when the memory planner fits the run without it in the free memory at start, "
        "else on.",
    )
    activation_offloading: bool | Literal["auto"] = Field(
        "auto",
        description="On a GPU, keep what the forward saves for the backward (with gradient checkpointing: each "
        "decoder layer's input) in pinned host memory until the backward needs it: the same results, the GPU "
        "holding one layer's input instead of all, for a copy each way. auto: on when the memory planner finds "
        "that the run does not fit the free GPU memory without it, else off. "
        "No effect on a CPU.",
    )

    packing: bool | Literal["auto"] = Field(
        "auto",
        description="Lay each micro-batch's examples end to end in one row, with no padding and attention kept "
        "within each example: the same step as padded rows (to rounding), less compute on mixed lengths. auto: "
        "on with sdpa attention (no sliding window shorter than an example, no soft-capped attention) and "
        "batch_size above 1, else off; true where the attention cannot take it is an error.",
    )

    @field_validator("batch_size", "gradient_checkpointing", "activation_offloading", "packing", mode="wrap")
    @classmethod
    def _auto_or_value(cls, value: Any, handler: Any, info: Any) -> Any:
        # "auto" or the plain type, with the plain type's own error (not a two-branch union error).
        if value == "auto":
            return "auto"
        plain = _POSITIVE_INT if info.field_name == "batch_size" else _BOOL
        try:
            return plain.validate_python(value)
        except ValidationError as exc:
            error = exc.errors()[0]
            raise PydanticCustomError(
                error["type"], error["msg"].replace("{", "(").replace("}", ")")
            ) from None

    save_every: int = Field(
        200, ge=0, description="Checkpoint every N optimizer steps (and at the end); 0: only at the end."
    )
    save_total_limit: int = Field(2, ge=0, description="Checkpoints kept (the newest); 0 keeps all.")
    eval_every: int = Field(
        200,
        ge=0,
        description="Evaluate every N optimizer steps (and at the end) when data.eval is set; 0: only at the end.",
    )
    log_every: int = Field(
        1,
        gt=0,
        description="Write a metrics.jsonl record every N optimizer steps (and at every evaluation and the "
        "last step).",
    )
    nan_policy: Literal["stop", "skip"] = Field(
        "stop",
        description="A NaN/inf loss or gradient: stop (keeping the last good checkpoint) or skip the step and "
        "count it.",
    )


class SftSpec(TrainSpec):
    """Supervised fine-tuning: the loss covers the assistant's tokens only."""


class DpoDataSpec(DataSpec):
    """Where the preference pairs (or KTO's unpaired rows) come from."""

    format: Literal["auto", "preference", "hh_rlhf", "unpaired"] = Field(
        "auto",
        description="preference: prompt/chosen/rejected as strings, or chosen/rejected as full conversations "
        "sharing the prompt turns. hh_rlhf: chosen/rejected as HH-RLHF texts (turns marked `Human:` / "
        "`Assistant:`), split into turns. unpaired: prompt/completion/label rows, for loss: kto. auto: unpaired "
        "when the first row has completion and label, hh_rlhf when its chosen is such a text and it has no "
        "prompt, else preference.",
    )
    columns: dict[str, str] = Field(
        {},
        description="The dataset's own column names for the fields a pair is read from, as field: column, e.g. "
        "`{prompt: question, chosen: response_j, rejected: response_k}`; applied to train and eval rows before "
        "the format is picked. The mapped column is read instead of any column already named like the field "
        "(said at the start), and no two fields may read one column. Fields: prompt, chosen, rejected, tools; for KTO's unpaired rows "
        "also completion and label.",
    )

    FIELDS: ClassVar[tuple[str, ...]] = ("prompt", "chosen", "rejected", "tools", "completion", "label")


class DpoSpec(TrainSpec):
    """Direct Preference Optimization; the other keys are those of sft, with their defaults."""

    data: DpoDataSpec = Field(description="Where the training (and eval) preference pairs come from.")
    lr: float = Field(
        5.0e-6,
        gt=0,
        allow_inf_nan=False,
        description="Peak learning rate of AdamW, reached after warmup; DPO wants a much lower one than SFT.",
    )
    beta: float | Literal["auto"] = Field(
        "auto",
        description="Strength of the preference term, a number > 0: for sigmoid, ipo and hinge the pull towards "
        "the reference model (lower lets the policy move further); simpo: its reward scale; orpo: the weight of "
        "the odds-ratio term beside the NLL (the paper's lambda). auto: 2.0 for simpo (its paper used 2.0-2.5), "
        "else 0.1.",
    )
    loss: Literal["sigmoid", "ipo", "hinge", "simpo", "orpo", "kto"] = Field(
        "sigmoid",
        description="sigmoid: the DPO paper's loss; ipo: IPO, on length-averaged log-probs; hinge: SLiC's "
        "hinge loss; simpo: SimPO and orpo: ORPO, both reference-free (no reference pass, nothing cached), "
        "orpo with SFT's loss on the chosen reply built in; kto: KTO, on unpaired rows labelled desirable or "
        "not (data.format unpaired).",
    )
    simpo_gamma: float = Field(
        0.5,
        ge=0,
        allow_inf_nan=False,
        description="SimPO's target margin gamma: how far beta * the chosen reply's mean log-prob per token "
        "should exceed the rejected one's (simpo only; another value with another loss is an error).",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        allow_inf_nan=False,
        description="Conservative DPO: the assumed probability that a preference label is flipped (sigmoid "
        "loss only; above 0 with another loss is an error).",
    )
    rpo_alpha: float = Field(
        0.0,
        ge=0,
        allow_inf_nan=False,
        description="Weight of the chosen reply's NLL (mean per token) added to each pair's loss: RPO (Pang et "
        "al. 2024). DPO can lower the chosen reply's likelihood along with the rejected one's and drift from "
        "what SFT taught; this term holds it (sigmoid, ipo and hinge only; above 0 with another loss is an "
        "error).",
    )
    desirable_weight: float = Field(
        1.0,
        gt=0,
        allow_inf_nan=False,
        description="KTO: weight of the desirable rows' losses; the KTO paper recommends desirable_weight * "
        "desirable rows / (undesirable_weight * undesirable rows) in [1, 4/3] (outside it is warned about).",
    )
    undesirable_weight: float = Field(
        1.0, gt=0, allow_inf_nan=False, description="KTO: weight of the undesirable rows' losses."
    )
    reference: Literal["precompute", "live"] = Field(
        "precompute",
        description="precompute: one pass over the data before training, cached on disk; live: every step "
        "(no cache). simpo and orpo have no reference: live with them is an error.",
    )
    init_adapter: str | None = Field(
        None,
        description="Adapter folder to start from (and to use as the frozen reference), relative to the "
        "recipe; default `<output_dir>/sft/adapter` if it exists, else a fresh adapter on the base.",
    )

    @field_validator("beta", mode="wrap")
    @classmethod
    def _auto_or_beta(cls, value: Any, handler: Any) -> Any:
        # "auto" or a positive finite float, with the float's own error (not a two-branch union error).
        if value == "auto":
            return "auto"
        try:
            return _BETA.validate_python(value)
        except ValidationError as exc:
            error = exc.errors()[0]
            raise PydanticCustomError(
                error["type"], error["msg"].replace("{", "(").replace("}", ")")
            ) from None

    @model_validator(mode="after")
    def _resolve_beta(self) -> DpoSpec:
        # Resolved here so that the code, the resolved recipe and the run's identity only ever see a number.
        if self.beta == "auto":
            self.beta = SIMPO_BETA if self.loss == "simpo" else DPO_BETA
        return self

    @property
    def reference_free(self) -> bool:
        """simpo and orpo score the policy alone: no reference model, no reference pass, no cache."""
        return self.loss in REFERENCE_FREE


class MergeSpec(_Section):
    """Export: the adapter folded into 16-bit weights. These keys are also the defaults of `qalign merge`."""

    dtype: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="Precision of the exported weights.")
    base_weights: Literal["nf4-roundtrip", "original"] = Field(
        "nf4-roundtrip",
        description="nf4-roundtrip: add the adapter to the base weights as training saw them (quantized, "
        "dequantized), so the merged model computes what was trained. original: add it to the untouched "
        "16-bit weights.",
    )
    out: str | None = Field(
        None, description="Output folder, relative to the recipe; default `<output_dir>/merged`."
    )


class ExportSpec(_Section):
    """GGUF files for llama.cpp, Ollama and LM Studio, made from the merged model (as `qalign export`)."""

    gguf: list[Literal["f32", "f16", "bf16", "q8_0", "q4_k_m"]] = Field(
        ["q8_0"],  # pydantic copies a mutable default for each recipe
        min_length=1,
        description="One `<name>-<type>.gguf` file, with its Ollama Modelfile, per weight type.",
    )
    out: str | None = Field(
        None, description="Folder for the files, relative to the recipe; default `<output_dir>/gguf`."
    )


class DistributedSpec(_Section):
    """More than one process (`--nproc N`, torchrun): how the work is split."""

    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: every process holds the whole 4-bit model and its adapter; gradients are averaged. "
        "fsdp: each decoder layer's weights, the 4-bit base's included, are split over the processes and "
        "gathered while the layer runs (FSDP2), for a model whose 4-bit weights do not fit one GPU. One process "
        "ignores it.",
    )


class Recipe(_Section):
    """The whole recipe: one YAML file that drives every stage; relative paths are relative to it."""

    name: str = Field(min_length=1, description="The run's name; output_dir defaults to `runs/<name>`.")
    output_dir: str | None = Field(
        None,
        description="Where the run's outputs go (a folder per stage, merged/ for the export), relative to the "
        "recipe; default `runs/<name>` beside the recipe.",
    )
    seed: int = Field(
        0, description="Seeds the adapter's initial weights, dropout and the order of the training data."
    )
    report_to: list[Literal["tensorboard", "wandb", "trackio"]] = Field(
        [],
        description="Where else training metrics go, beside metrics.jsonl (the same names at the same steps): "
        "tensorboard (event files in `<output_dir>/<stage>/tensorboard/`), wandb, trackio. Each needs its "
        'extra, e.g. `pip install "qalign[tensorboard]"`; checked before training starts.',
    )
    model: ModelSpec = Field(description="The base model.")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="The adapter; every key has a default.")
    sft: SftSpec | None = Field(None, description="Supervised fine-tuning; absent: no SFT stage.")
    dpo: DpoSpec | None = Field(None, description="Preference optimization; absent: no DPO stage.")
    merge: MergeSpec | None = Field(
        None, description="When present, `qalign run` ends by merging the last stage's adapter."
    )
    export: ExportSpec | None = Field(
        None,
        description="When present, `qalign run` ends by writing GGUF files from the merged model (after the "
        "merge, so it needs a `merge` section).",
    )
    distributed: DistributedSpec = Field(
        default_factory=DistributedSpec,
        description="How more than one process shares the training (`qalign sft --nproc N`); every key has a "
        "default.",
    )

    @field_validator("report_to")
    @classmethod
    def _once_each(cls, value: list[str]) -> list[str]:
        # Listing a tracker twice would log every scalar twice to it.
        return list(dict.fromkeys(value))

    # Not recipe keys: where the recipe came from, so that relative paths and messages can name it.
    _source: Path = Path("recipe.yaml")

    @property
    def source(self) -> Path:
        return self._source

    @property
    def out(self) -> Path:
        assert self.output_dir is not None  # set by load_recipe
        return Path(self.output_dir)

    def to_yaml(self) -> str:
        """The fully resolved recipe (defaults filled in, paths absolute), as written beside the outputs."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
