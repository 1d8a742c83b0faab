"""The recipe: one YAML file, validated by a typed schema, that drives every stage.

Unknown keys are errors (with a did-you-mean), every error names the file and line of the offending key,
relative paths resolve against the recipe's folder, and any key can be overridden with `--set a.b=value`.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
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

from qalign.errors import UserError


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

    packing: bool | Literal["auto"] = Field(
        "auto",
        description="Lay each micro-batch's examples end to end in one row, with no padding and attention kept "
        "within each example: the same step as padded rows (to rounding), less compute on mixed lengths. auto: "
        "on with sdpa attention (no sliding window shorter than an example, no soft-capped attention) and "
        "batch_size above 1, else off; true where the attention cannot take it is an error.",
    )

    @field_validator("batch_size", "gradient_checkpointing", "packing", mode="wrap")
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


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override, validate and resolve a recipe file. Raises UserError with file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the recipe ({exc})") from None
    return parse_recipe(text, path, overrides or [])


def parse_recipe(text: str, path: Path, overrides: list[str]) -> Recipe:
    try:
        raw = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(
            f"{where}: invalid YAML: {problem} (recipes are plain YAML: no !!python tags)"
        ) from None
    if raw is None:
        raise UserError(f"{path}: the recipe is empty; see recipes/ for examples")
    _reject_duplicate_keys(root, path)
    if not isinstance(raw, dict):
        raise UserError(
            f"{path}: the recipe must be a mapping of keys (name:, model:, ...), not {type(raw).__name__}"
        )
    overridden = {_apply_override(raw, item) for item in overrides}
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise UserError(_explain(exc, path, root, overridden)) from None
    recipe._source = path.resolve()

    def locate(key: str) -> str:
        return _where(path, root, key.split("."), overridden)

    _resolve_paths(recipe, path.resolve().parent, locate)
    if recipe.dpo is not None:
        _check_loss_keys(recipe.dpo, locate)
    return recipe


def _check_loss_keys(dpo: DpoSpec, locate: Callable[[str], str]) -> None:
    """A DPO key that the chosen loss does not read must stay at its default: set to anything else, the user
    expects an effect that would silently not happen. (At the default it may be written out, as the recipes
    from `qalign init` write every key.)"""
    unused = (
        ("reference", dpo.reference_free, "the losses with a reference model, not simpo or orpo"),
        ("label_smoothing", dpo.loss != "sigmoid", "only the sigmoid loss"),
        ("simpo_gamma", dpo.loss != "simpo", "only the simpo loss"),
        ("desirable_weight", dpo.loss != "kto", "only the kto loss"),
        ("undesirable_weight", dpo.loss != "kto", "only the kto loss"),
    )
    for key, is_unused, readers in unused:
        if is_unused and getattr(dpo, key) != DpoSpec.model_fields[key].default:
            raise UserError(
                f"{locate(f'dpo.{key}')}: dpo.{key}: {getattr(dpo, key)} has no effect with dpo.loss: {dpo.loss} "
                f"(it is read by {readers}); remove the key or change dpo.loss"
            )


def _reject_duplicate_keys(node: yaml.Node, path: Path, prefix: str = "") -> None:
    # YAML lets a later key silently replace an earlier one; in a recipe that hides an edit.
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            name, line = str(key.value), key.start_mark.line + 1
            if name in seen:
                raise UserError(
                    f"{path}:{line}: duplicate key '{prefix}{name}' (first set on line {seen[name]}); keep one"
                )
            seen[name] = line
            _reject_duplicate_keys(value, path, f"{prefix}{name}.")
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _reject_duplicate_keys(item, path, prefix)


def _apply_override(raw: dict, item: str) -> str:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"--set {item}: expected KEY=VALUE with a dotted key, e.g. --set sft.lr=1e-4")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"--set {item}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = parsed
    return key


def _resolve_paths(recipe: Recipe, base_dir: Path, locate: Callable[[str], str]) -> None:
    """Make paths absolute; a missing file is blamed on the line (or the --set) that named it."""
    recipe.output_dir = str(_local(recipe.output_dir or f"runs/{recipe.name}", base_dir))
    recipe.model.base = _model_or_path(recipe.model.base, base_dir, "model.base", locate)
    if recipe.model.chat_template is not None:
        template = _local(recipe.model.chat_template, base_dir)
        if not template.is_file():
            raise UserError(
                f"{locate('model.chat_template')}: model.chat_template: file {template} not found"
            )
        recipe.model.chat_template = str(template)
    for name in ("sft", "dpo"):
        stage = getattr(recipe, name)
        if stage is None:
            continue
        stage.data.train = _data_or_path(stage.data.train, base_dir, f"{name}.data.train", locate)
        if stage.data.eval is not None:
            stage.data.eval = _data_or_path(stage.data.eval, base_dir, f"{name}.data.eval", locate)
    if recipe.merge is not None and recipe.merge.out is not None:
        recipe.merge.out = str(_local(recipe.merge.out, base_dir))
    if recipe.export is not None:
        if recipe.merge is None:
            raise UserError(
                f"{locate('export')}: export: the GGUF files are made from the merged model; add a `merge:` "
                "section (`merge: {}` takes its defaults)"
            )
        if recipe.export.out is not None:
            recipe.export.out = str(_local(recipe.export.out, base_dir))
    if recipe.dpo is not None and recipe.dpo.init_adapter is not None:
        adapter = _local(recipe.dpo.init_adapter, base_dir)
        if not (adapter / "adapter_config.json").is_file():
            raise UserError(
                f"{locate('dpo.init_adapter')}: dpo.init_adapter: {adapter} is not an adapter folder"
            )
        recipe.dpo.init_adapter = str(adapter)


def _local(value: str, base_dir: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base_dir / path).resolve()


def _looks_like_path(value: str) -> bool:
    return value.startswith((".", "/", "~")) or "\\" in value or value.count("/") > 1


def _model_or_path(value: str, base_dir: Path, key: str, locate: Callable[[str], str]) -> str:
    """A local folder when one exists (or the value can only be a path); otherwise a hub id."""
    local = _local(value, base_dir)
    if local.exists():
        return str(local)
    if _looks_like_path(value):
        raise UserError(f"{locate(key)}: {key}: folder {local} not found (a hub id looks like org/name)")
    return value


_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def _data_or_path(value: str, base_dir: Path, key: str, locate: Callable[[str], str]) -> str:
    local = _local(value, base_dir)
    if local.exists():
        return str(local)
    if _looks_like_path(value) or value.lower().endswith(_DATA_SUFFIXES):
        raise UserError(f"{locate(key)}: {key}: file {local} not found")
    return value


def _explain(exc: ValidationError, path: Path, root: yaml.Node, overridden: set[str]) -> str:
    errors = exc.errors()
    first = errors[0]
    loc = [str(part) for part in first["loc"]]
    dotted = ".".join(loc)
    where = _where(path, root, loc, overridden)
    if first["type"] == "extra_forbidden":
        message = f"{where}: unknown key '{dotted}'{_did_you_mean(loc)}"
    elif first["type"] == "missing":
        message = f"{where}: missing required key '{dotted}'"
    else:
        shown = first.get("input")
        got = "" if isinstance(shown, dict) else f" (got {shown!r})"
        if isinstance(shown, float) and math.isnan(shown):
            got = " (got nan)"
        message = f"{where}: {dotted}: {first['msg']}{got}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return message


def _where(path: Path, root: yaml.Node, loc: list[str], overridden: set[str]) -> str:
    dotted = ".".join(loc)
    for key in overridden:
        if dotted == key or dotted.startswith(key + ".") or key.startswith(dotted + "."):
            return f"--set {key}"
    node, line = root, None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == part), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            break
    return f"{path}:{line}" if line else str(path)


def _schema_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    paths = []
    for name, field in model.model_fields.items():
        paths.append(prefix + name)
        for sub in _section_types(field.annotation):
            paths.extend(_schema_paths(sub, prefix + name + "."))
    return paths


def _section_types(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [
        a for a in getattr(annotation, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)
    ]


# What users of TRL, Axolotl and LLaMA-Factory call our keys.
ALIASES = {
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "num_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "micro_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "max_seq_length": "max_length",
    "sequence_len": "max_length",
    "cutoff_len": "max_length",
    "lr_scheduler_type": "scheduler",
    "lr_scheduler": "scheduler",
    "save_steps": "save_every",
    "eval_steps": "eval_every",
    "logging_steps": "log_every",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lora_target_modules": "target_modules",
    "model_name_or_path": "base",
    "base_model": "base",
    "bf16": "compute_dtype",
    "load_in_4bit": "quantization",
}


def _did_you_mean(loc: list[str]) -> str:
    known = _schema_paths(Recipe)
    parent, leaf = ".".join(loc[:-1]), loc[-1]
    leaf = ALIASES.get(leaf, leaf)
    siblings = [p.rsplit(".", 1)[-1] for p in known if p.rpartition(".")[0] == parent]
    prefix = parent + "." if parent else ""
    if leaf in siblings:  # a peer tool's name for one of our keys
        return f"; did you mean '{prefix}{leaf}'?"
    # An exact name in another section beats a fuzzy one here: top-level 'lr' means 'sft.lr', not 'lora'.
    elsewhere = [p for p in known if p.rsplit(".", 1)[-1] == leaf]
    if elsewhere:
        return f"; did you mean '{elsewhere[0]}'?"
    close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    return f"; known keys here: {', '.join(siblings)}" if siblings else ""
