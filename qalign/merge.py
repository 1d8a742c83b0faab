"""Folding a LoRA adapter into full-precision weights, and checking that the result computes what was trained.

Never into 4-bit weights: the base is loaded once in 16-bit, each adapted weight gets its LoRA delta added in
fp32 (by peft, see fold.py) and is cast once. With `nf4-roundtrip` every layer training quantized, adapted or
not, is the base weight quantized and dequantized exactly as training saw it (read from the checkpoint in its
stored precision, quantized with the same block size, type and double quantization), so the merged model
computes what was trained; `original` keeps the untouched weights instead.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from qalign.adapter import TrainedAs, adapter_digest
from qalign.atomic import atomic_dir, atomic_write_text
from qalign.errors import UserError
from qalign.fold import check_adapter, fold, quantized_in_training
from qalign.model import DTYPES
from qalign.progress import Progress

# bitsandbytes' 4-bit block size, which transformers' loader uses.
BLOCKSIZE = 64


def _checkpoint_reader(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, for reading single weights in their stored dtype."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return {k: model_dir / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    single = model_dir / "model.safetensors"
    if single.exists():
        with safe_open(str(single), "pt") as handle:
            return dict.fromkeys(handle.keys(), single)
    return {}


def _stored_weight(reader: dict[str, Path], name: str, fallback: torch.Tensor) -> torch.Tensor:
    path = reader.get(name)
    if path is None:  # a checkpoint whose names transformers converts on load: the loaded tensor is exact too
        return fallback
    with safe_open(str(path), "pt") as handle:
        return handle.get_tensor(name)


def roundtrip(weight: torch.Tensor, trained: TrainedAs) -> torch.Tensor:
    """The weight as the 4-bit layer handed it to the matmul during training."""
    import bitsandbytes.functional as bnbf

    as_loaded = weight.to(DTYPES[trained.compute_dtype])
    packed, state = bnbf.quantize_4bit(
        as_loaded,
        blocksize=BLOCKSIZE,
        compress_statistics=trained.double_quant,
        quant_type=trained.quantization,
    )
    return bnbf.dequantize_4bit(packed, state)


def refuse_existing(out: Path, overwrite: bool) -> None:
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it")


def merge_to_folder(
    trained: TrainedAs,
    adapter: Path,
    out: Path,
    dtype: str,
    base_weights: str,
    progress: Progress,
    overwrite: bool = False,
    check: Callable[[Path], None] | None = None,
) -> None:
    """Write the merged model (sharded safetensors, config without quantization, tokenizer) atomically;
    `check` runs on the finished folder before it is renamed into place, so it can add its report."""
    from transformers import AutoModelForCausalLM

    refuse_existing(out, overwrite)
    check_adapter(adapter)  # fail on a bad adapter before the slow base load
    if base_weights == "nf4-roundtrip" and trained.quantization == "none":
        base_weights = "original"  # nothing was quantized in training
    try:
        model = AutoModelForCausalLM.from_pretrained(
            trained.base,
            revision=trained.revision,
            dtype=DTYPES[dtype],
            trust_remote_code=trained.trust_remote_code,
            use_safetensors=True,
            low_cpu_mem_usage=True,
        )
    except (OSError, ValueError) as exc:
        raise UserError(
            f"cannot load the base '{trained.base}' in 16-bit: {str(exc).splitlines()[0]}"
        ) from None
    if getattr(model.config, "quantization_config", None) is not None:
        raise UserError(
            f"{trained.base} is a pre-quantized checkpoint; merge needs the original 16-bit weights"
        )
    reader = _checkpoint_reader(Path(trained.base)) if Path(trained.base).is_dir() else {}
    model = _fold(model, adapter, reader, base_weights, trained, progress)
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer = load_tokenizer(adapter, trained)
    _stop_at_end_of_turn(model, tokenizer)
    with atomic_dir(out, replace=overwrite) as folder:
        model.save_pretrained(folder, safe_serialization=True, max_shard_size="2GB")
        tokenizer.save_pretrained(folder)
        del model
        gc.collect()  # the check loads other models; never two 16-bit copies at once
        if check is not None:
            check(folder)
    progress.info(f"merged model written to {out} ({dtype}, base weights {base_weights})")


def load_tokenizer(adapter: Path, trained: TrainedAs) -> object:
    """The tokenizer qalign saved with the adapter (the one trained with, chat template included), else the
    base's: adapters saved by peft alone carry none."""
    from transformers import AutoTokenizer

    if (adapter / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(adapter)
    try:
        return AutoTokenizer.from_pretrained(
            trained.base, revision=trained.revision, trust_remote_code=trained.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise UserError(
            f"{adapter} has no tokenizer and the base's does not load: {str(exc).splitlines()[0]}"
        ) from None


def _stop_at_end_of_turn(model: torch.nn.Module, tokenizer: object) -> None:
    """Inference engines stop at generation_config's EOS ids; a chat model must stop at its end-of-turn token
    too (e.g. <|im_end|> when the tokenizer's EOS is <|endoftext|>), or it keeps talking."""
    from qalign.chat_template import end_of_turn_id

    end = end_of_turn_id(tokenizer)
    eos = model.generation_config.eos_token_id
    ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    for token in (tokenizer.eos_token_id, end):
        if token is not None and token not in ids:
            ids.append(token)
    model.generation_config.eos_token_id = ids[0] if len(ids) == 1 else ids
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def _fold(
    model: torch.nn.Module,
    adapter: Path,
    reader: dict[str, Path],
    base_weights: str,
    trained: TrainedAs,
    progress: Progress,
) -> torch.nn.Module:
    from transformers.pytorch_utils import Conv1D

    quantized = quantized_in_training(model) if base_weights == "nf4-roundtrip" else set()
    adapted: set[str] = set()

    def start_weight(name: str, layer: torch.nn.Module) -> torch.Tensor:
        adapted.add(name)
        start = _stored_weight(reader, f"{name}.weight", layer.weight).float()
        if name not in quantized:
            return start
        if isinstance(layer, Conv1D):  # transformers quantizes GPT-2's (in, out) weights transposed
            return roundtrip(start.T, trained).float().T
        return roundtrip(start, trained).float()

    merged = fold(model, adapter, start_weight, progress)
    # Layers without LoRA were 4-bit in training too: the merged model must compute with them as trained.
    modules = dict(merged.named_modules())
    plain = sorted(quantized - adapted)
    if not plain:
        return merged
    with torch.no_grad(), progress.bar("round-trip", len(plain), 0, unit="layer") as bar:
        for done, name in enumerate(plain, start=1):
            layer = modules[name]
            layer.weight.data = start_weight(name, layer).to(layer.weight.dtype)
            bar.update(done, {})
    return merged


@torch.no_grad()
def fidelity(trained: TrainedAs, adapter: Path, merged: Path, texts: list[str]) -> dict:
    """Logits of the merged model against the base + adapter exactly as trained, both computing in the
    training's compute dtype (the merged weights keep their own rounding), on `texts`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qalign.model import load_base
    from qalign.recipe import ModelSpec

    tokenizer = AutoTokenizer.from_pretrained(merged)
    encoded = [tokenizer(t, add_special_tokens=False, return_tensors="pt")["input_ids"] for t in texts]
    spec = ModelSpec(
        base=trained.base,
        revision=trained.revision,
        quantization=trained.quantization,
        double_quant=trained.double_quant,
        compute_dtype=trained.compute_dtype,
        trust_remote_code=trained.trust_remote_code,
    )
    # One model at a time, so the check never holds two 16-bit copies.
    reference = PeftModel.from_pretrained(load_base(spec, torch.device("cpu")), str(adapter)).eval()
    expected = [reference(input_ids=ids).logits.float() for ids in encoded]
    del reference
    compute = DTYPES[trained.compute_dtype]
    model = AutoModelForCausalLM.from_pretrained(merged).to(compute).eval()
    got = [model(input_ids=ids).logits.float() for ids in encoded]
    del model
    ref, out = torch.cat([e[0] for e in expected]), torch.cat([g[0] for g in got])
    kl = torch.nn.functional.kl_div(
        out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none"
    )
    return {
        "max_abs_logit_diff": (ref - out).abs().max().item(),
        "mean_kl": max(0.0, kl.sum(-1).mean().item()),  # float noise can dip below zero
        "top1_agreement": (ref.argmax(-1) == out.argmax(-1)).float().mean().item(),
        "positions": int(ref.shape[0]),
        "examples": len(texts),
        "compute_dtype": trained.compute_dtype,
    }


BUILTIN_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "Explain in one sentence why the sky is blue.",
    "List three prime numbers.",
)
# Below these the merged model visibly computes something other than what was trained.
MIN_TOP1_AGREEMENT = 0.98
MAX_MEAN_KL = 0.01


def sample_texts(tokenizer: object, conversations: list[list[dict]]) -> list[str]:
    """A few rendered conversations from the run's own data, else built-in prompts in the chat template."""
    if not conversations:
        conversations = [[{"role": "user", "content": p}] for p in BUILTIN_PROMPTS]
    texts = []
    for messages in conversations[:4]:
        open_turn = messages[-1]["role"] != "assistant"
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=open_turn))
    return texts


def merge(
    trained: TrainedAs,
    adapter: Path,
    out: Path,
    dtype: str,
    base_weights: str,
    conversations: list[list[dict]],
    progress: Progress,
    overwrite: bool = False,
) -> dict:
    """Merge, check fidelity on the finished folder, and save merge_report.json beside the weights."""
    report: dict = {
        "base": trained.base,
        "adapter": str(adapter),
        "adapter_sha256": adapter_digest(adapter),
        "dtype": dtype,
        "base_weights": base_weights,
        "trained_as": trained.__dict__,
    }

    def check(folder: Path) -> None:
        texts = sample_texts(load_tokenizer(adapter, trained), conversations)
        report["fidelity"] = fidelity(trained, adapter, folder, texts)
        atomic_write_text(folder / "merge_report.json", json.dumps(report, indent=2) + "\n")

    merge_to_folder(trained, adapter, out, dtype, base_weights, progress, overwrite, check)
    result = report["fidelity"]
    progress.info(
        f"fidelity vs base + adapter as trained ({result['positions']} positions, computing in "
        f"{result['compute_dtype']}): max |logit diff| "
        f"{result['max_abs_logit_diff']:.3g}, mean KL {result['mean_kl']:.3g}, "
        f"top-1 agreement {result['top1_agreement']:.1%}"
    )
    if result["top1_agreement"] < MIN_TOP1_AGREEMENT or result["mean_kl"] > MAX_MEAN_KL:
        progress.warn(
            "POOR FIDELITY: the merged model does not compute what was trained "
            f"({fidelity_hint(trained, dtype, base_weights)})"
        )
    return report


def fidelity_hint(trained: TrainedAs, dtype: str, base_weights: str) -> str:
    """What would narrow the gap down, given what this merge already did."""
    if base_weights == "original" and trained.quantization != "none":
        return (
            "base_weights: original adds the adapter to weights it was not trained against; "
            "use merge.base_weights: nf4-roundtrip (--base-weights nf4-roundtrip)"
        )
    if dtype != "fp32":
        return f"the weights were rounded to {dtype}; merge.dtype: fp32 (--dtype fp32) shows whether that is the cause"
    # An fp32 fold onto the weights training saw is exact; what is left is the check itself or the base.
    where = f"{trained.base}" + (f" at revision {trained.revision}" if trained.revision else "")
    if trained.compute_dtype != "fp32":
        return (
            f"the fold is exact in fp32, so the gap is {trained.compute_dtype} compute rounding in the check, "
            f"or {where} is not the base this adapter was trained on"
        )
    return (
        f"the fold is exact in fp32, so {where} is not the base this adapter was trained on; check model.base"
    )


def run_merge(
    recipe: object,
    progress: Progress,
    stage: str | None = None,
    out: Path | None = None,
    dtype: str | None = None,
    base_weights: str | None = None,
    overwrite: bool = False,
    replace_own: bool = False,
) -> Path:
    """`qalign merge RECIPE`: the last stage's adapter (or `stage`'s) into <output_dir>/merged/. `replace_own`:
    an earlier export of this recipe (one with qalign's merge report) may be replaced without `overwrite`, as
    `qalign run` does when a stage changed: it owns its export as it owns the stages."""
    from qalign.data import read_rows, to_messages
    from qalign.layout import find_adapter, merged_folder
    from qalign.recipe import MergeSpec

    adapter = find_adapter(recipe, stage)
    if adapter.parent.name == "dpo":
        from qalign.identity import stale_start

        stale = stale_start(recipe)
        if stale is not None:
            raise UserError(
                f"{stale}: exporting it would leave the sft training out. Train dpo again "
                f"(qalign dpo {recipe.source} --no-resume --overwrite, or qalign run {recipe.source}), "
                "or merge the sft adapter with --stage sft"
            )
    spec = recipe.merge or MergeSpec()
    out = out or merged_folder(recipe)
    dtype, base_weights = dtype or spec.dtype, base_weights or spec.base_weights
    report_path = out / "merge_report.json"
    if report_path.exists() and not overwrite:
        done = json.loads(report_path.read_text())
        if done.get("adapter_sha256") == adapter_digest(adapter) and (
            done["dtype"],
            done["base_weights"],
        ) == (
            dtype,
            base_weights,
        ):
            progress.info(f"merge is already complete: {out}")
            return out
    overwrite = overwrite or (replace_own and report_path.is_file())
    refuse_existing(out, overwrite)  # before reading data: an earlier export stays exactly as it was
    trained = TrainedAs.from_adapter(adapter, base=recipe.model.base)
    conversations = []
    stage_spec = getattr(recipe, adapter.parent.name)
    try:
        from qalign.stage_data import shape_rows

        rows = read_rows(stage_spec.data.train, stage_spec.data.train_split)[:4]
        rows, fmt, _, _ = shape_rows(adapter.parent.name, stage_spec.data, rows, stage_spec.data.train)
        if adapter.parent.name == "sft":
            from qalign.data import detect_format

            fmt = detect_format(rows, fmt)
            conversations = [to_messages(row, fmt) for row in rows]
        else:
            from qalign.dpo import split_preference

            conversations = [[*p, c] for p, c, _ in (split_preference(row) for row in rows)]
    except UserError as exc:
        progress.warn(f"checking fidelity on built-in prompts: the training data is not readable ({exc})")
    merge(
        trained,
        adapter,
        out,
        dtype,
        base_weights,
        conversations,
        progress,
        overwrite=overwrite,
    )
    return out
