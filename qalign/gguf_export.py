"""`qalign export`: a transformers model folder written as one GGUF file that llama.cpp, Ollama and LM Studio
load, with an Ollama Modelfile beside it.

Tensors are read one at a time from the safetensors files and written as they are converted, so memory stays
near the size of the largest tensor. The file is built under a temporary name in the destination folder and
renamed into place once fsynced, so an interrupted export never leaves a truncated .gguf behind.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qalign.atomic import atomic_write_text, fsync_dir, tmp_name
from qalign.errors import UserError
from qalign.gguf_quant import QUANTS, nbytes, quantize, tensor_type
from qalign.gguf_vocab import Vocab, read_vocab, write_vocab
from qalign.layout import gguf_folder, merged_folder
from qalign.progress import Progress

if TYPE_CHECKING:
    from qalign.recipe import Recipe


@dataclass(frozen=True)
class _Arch:
    gguf_name: str
    # llama.cpp's `llama` graph applies RoPE to interleaved pairs, transformers' Llama to the two halves of each
    # head; permuting the rows of Q and K maps one layout onto the other. Qwen's graphs use the halves layout.
    permute_qk: bool
    # Gemma's RMSNorm multiplies by (1 + weight); llama.cpp's by the weight, so the 1 goes into the file.
    norm_offset: float = 0.0
    # An image-text checkpoint whose language model is exported alone (its config under text_config).
    multimodal: bool = False


ARCHITECTURES = {
    "LlamaForCausalLM": _Arch("llama", True),
    "MistralForCausalLM": _Arch("llama", True),
    "Qwen2ForCausalLM": _Arch("qwen2", False),
    "Qwen3ForCausalLM": _Arch("qwen3", False),
    # Q, K, V and gate/up stay fused, as llama.cpp's phi3 graph takes them.
    "Phi3ForCausalLM": _Arch("phi3", False),
    "Gemma2ForCausalLM": _Arch("gemma2", False, norm_offset=1.0),
    "Gemma3ForCausalLM": _Arch("gemma3", False, norm_offset=1.0),
    # The language model of Gemma 3's image-text checkpoints (4B and up); the vision tower is left out.
    "Gemma3ForConditionalGeneration": _Arch("gemma3", False, norm_offset=1.0, multimodal=True),
}


def _supported() -> str:
    return ", ".join(ARCHITECTURES)


def _weight_files(model_dir: Path) -> dict[str, Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        mapping = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: model_dir / file for name, file in mapping.items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise UserError(f"{model_dir} has no safetensors weights (model.safetensors or its index)")
    from safetensors import safe_open

    with safe_open(str(single), "np") as handle:
        return dict.fromkeys(handle.keys(), single)


def _read(path: Path, name: str) -> np.ndarray:
    # Through torch so bf16 checkpoints read too (numpy has no bfloat16).
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return handle.get_tensor(name).float().numpy()


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _rope_scaling(config: dict[str, Any], layer_type: str = "full_attention") -> tuple[float, dict[str, Any]]:
    # transformers 5 keeps theta and scaling together in rope_parameters; older configs split them. Gemma 3
    # has one set per layer type (sliding or full attention); the others one for all layers.
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if "full_attention" in params or "sliding_attention" in params:
        params = dict(params.get(layer_type) or {})
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    return theta, {**params, "rope_type": kind}


def _llama3_rope_factors(rope: dict[str, Any], theta: float, head_dim: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1's RoPE: llama.cpp takes them as a `rope_freqs` tensor."""
    factor = float(rope["factor"])
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    original = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    factors = np.where(
        wavelen < original / high,
        1.0,
        np.where(wavelen > original / low, factor, 1.0 / ((1 - smooth) / factor + smooth)),
    )
    return factors.astype(np.float32)


def _language_model_name(hf_name: str) -> str | None:
    """A Gemma 3 image-text checkpoint's language-model tensor under its Gemma3ForCausalLM name (transformers
    5 and 4 lay them out differently); None for the vision tower and the projector, which stay out."""
    for prefix in ("model.language_model.", "language_model.model."):
        if hf_name.startswith(prefix):
            return "model." + hf_name[len(prefix) :]
    if hf_name in ("lm_head.weight", "language_model.lm_head.weight"):
        return "lm_head.weight"
    return None


# The layer count at which llama.cpp takes a Gemma for its 27B and scales queries by 1/sqrt(hidden/heads).
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _query_fold(config: dict[str, Any], arch: str) -> float:
    """What Gemma's queries are multiplied by so that llama.cpp's query scale becomes the config's.

    llama.cpp scales Gemma 2's and 3's queries by 1/sqrt(hidden/heads) for the 27B models (told apart by their
    layer count) and by 1/sqrt(head_dim) otherwise, whatever query_pre_attn_scalar says. Scaling the queries
    by sqrt(llama.cpp's scalar / query_pre_attn_scalar) before that gives exactly 1/sqrt(query_pre_attn_scalar);
    RoPE is linear, so the factor goes into what makes the queries: Gemma 3's query-norm weight, Gemma 2's
    query projection. For every released Gemma 2 and 3 the two scalars agree and this is 1."""
    if arch not in _GEMMA_27B_LAYERS:
        return 1.0
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    llama_cpp = hidden // heads if config["num_hidden_layers"] == _GEMMA_27B_LAYERS[arch] else head_dim
    return math.sqrt(llama_cpp / config.get("query_pre_attn_scalar", head_dim))


def _write_metadata(writer: Any, config: dict[str, Any], arch: _Arch, quant: str, name: str) -> None:
    import gguf

    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    if arch.gguf_name != "phi3":
        # llama.cpp gives Phi-3's special tokens extra attributes when the model's *name* says phi3, and fails
        # to load a vocabulary without them; a file merely named so must not trigger that.
        name = re.sub(r"(?i)phi-?3", "phi_3", name)
    writer.add_name(name)
    writer.add_file_type(QUANTS[quant][1])
    if quant not in ("f32", "f16", "bf16"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    if arch.gguf_name in ("phi3", "gemma2", "gemma3") and config.get("sliding_window"):
        writer.add_sliding_window(config["sliding_window"])
    if arch.gguf_name == "gemma2" and config.get("attn_logit_softcapping") is not None:
        writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
    if arch.gguf_name in ("gemma2", "gemma3") and config.get("final_logit_softcapping") is not None:
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    if arch.gguf_name == "gemma3":
        # Older llama.cpp builds ignore these two and assume what every released Gemma 3 has (every 6th layer
        # global, base 10000 for the sliding ones); llama.cpp 0.3.36's reads them, so other configs run too.
        writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in config["layer_types"]])
        writer.add_rope_freq_base_swa(_rope_scaling(config, "sliding_attention")[0])
    theta, rope = _rope_scaling(config)
    writer.add_rope_freq_base(theta)
    kind = rope["rope_type"]
    if kind in ("linear", "yarn"):
        writer.add_rope_scaling_type(
            gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN
        )
        writer.add_rope_scaling_factor(float(rope["factor"]))
        if "original_max_position_embeddings" in rope:
            writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))


def _tensors(model_dir: Path, config: dict[str, Any], arch: _Arch) -> list[tuple[str, tuple[int, ...], Any]]:
    """(GGUF name, shape, loader) for every tensor of the file, in file order; nothing is read yet."""
    import gguf

    files = _weight_files(model_dir)
    n_layers = config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    names = gguf.get_tensor_name_map(
        next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.gguf_name), n_layers
    )
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in set(files.values()):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                shapes[key] = tuple(handle.get_slice(key).get_shape())

    tied = config.get("tie_word_embeddings", False)
    query_fold = _query_fold(config, arch.gguf_name)
    # Where the fold goes: Gemma 3 normalizes its queries (a weight to scale), Gemma 2 does not.
    folded = ("attn_q_norm.weight",) if arch.gguf_name == "gemma3" else ("attn_q.weight", "attn_q.bias")
    out: list[tuple[str, tuple[int, ...], Any]] = []
    theta, rope = _rope_scaling(config)
    if rope["rope_type"] == "llama3":
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        factors = _llama3_rope_factors(rope, theta, head_dim)
        out.append(("rope_freqs.weight", factors.shape, lambda f=factors: f))
    for stored_name, path in files.items():
        hf_name = _language_model_name(stored_name) if arch.multimodal else stored_name
        if (
            hf_name is None
            or hf_name.endswith("rotary_emb.inv_freq")
            or (tied and hf_name == "lm_head.weight")
        ):
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(
                f"{model_dir}: no GGUF name for tensor {stored_name}; is this a {arch.gguf_name} model?"
            )
        heads_for = (
            {"attn_q": heads, "attn_k": kv_heads}.get(gguf_name.split(".")[-2]) if arch.permute_qk else None
        )

        offset = arch.norm_offset if gguf_name.endswith("norm.weight") else 0.0
        scale = query_fold if gguf_name.endswith(folded) else 1.0

        def load(
            p: Path = path,
            n: str = stored_name,
            h: int | None = heads_for,
            add: float = offset,
            mul: float = scale,
        ) -> np.ndarray:
            value = (_read(p, n) + add) * mul
            return _permute(value, h) if h is not None else value

        out.append((gguf_name, shapes[stored_name], load))
    return out


def _gemma3_config(model_dir: Path) -> dict[str, Any]:
    """Gemma 3's text config as transformers reads it: defaults filled in (the hub's image-text configs leave
    many out) and in transformers 5's layout (a type per layer, RoPE per layer type) whichever version wrote
    it; for an image-text checkpoint, its language model's, tied as the checkpoint says."""
    from transformers import AutoConfig

    full = AutoConfig.from_pretrained(model_dir)
    config = full.get_text_config().to_dict()
    config["tie_word_embeddings"] = full.tie_word_embeddings
    return config


def _check_gemma3(model_dir: Path, config: dict[str, Any]) -> None:
    """Refuse a Gemma 3 that llama.cpp's gemma3 graph would silently run as something else."""
    problems = []
    if config.get("use_bidirectional_attention"):
        problems.append("it attends both ways (EmbeddingGemma), not causally")
    if not config.get("sliding_window"):
        problems.append("it has no sliding_window (llama.cpp would then give every layer the global RoPE)")
    local = _rope_scaling(config, "sliding_attention")[1]["rope_type"]
    if local != "default":
        problems.append(f"its sliding layers use {local} RoPE scaling; llama.cpp scales only the global ones")
    kind = _rope_scaling(config)[1]["rope_type"]
    if kind not in ("default", "linear"):
        problems.append(f"its global layers use {kind} RoPE scaling; for Gemma 3 llama.cpp takes linear only")
    if config.get("attn_logit_softcapping") is not None:
        problems.append(
            "it sets attn_logit_softcapping (Gemma 2's), which llama.cpp's gemma3 graph does not apply"
        )
    if problems:
        raise UserError(f"{model_dir}: GGUF export of this Gemma 3 refused: " + "; ".join(problems))


_YARN_DEFAULTS = {"beta_fast": 32, "beta_slow": 1, "truncate": True}


def read_config(model_dir: Path) -> tuple[dict[str, Any], _Arch]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{model_dir} is not a transformers model folder (no config.json)")
    config = json.loads(path.read_text(encoding="utf-8"))
    found = (config.get("architectures") or ["?"])[0]
    if found not in ARCHITECTURES:
        raise UserError(f"{model_dir}: GGUF export of {found} is not supported; it can export {_supported()}")
    arch = ARCHITECTURES[found]
    if arch.gguf_name == "gemma3":
        config = _gemma3_config(model_dir)
        _check_gemma3(model_dir, config)
    kind = _rope_scaling(config)[1]["rope_type"]
    if kind not in ("default", "linear", "yarn", "llama3"):
        raise UserError(
            f"{model_dir}: RoPE scaling {kind!r} is not supported by GGUF export (default, linear, yarn, llama3)"
        )
    if kind == "yarn":
        # The file carries YaRN's factor and original context; llama.cpp takes its defaults for the rest.
        rope = _rope_scaling(config)[1]
        odd = [key for key in ("attention_factor", "mscale", "mscale_all_dim") if rope.get(key) is not None]
        odd += [key for key, usual in _YARN_DEFAULTS.items() if rope.get(key, usual) not in (usual, None)]
        if odd:
            raise UserError(
                f"{model_dir}: YaRN with {', '.join(odd)} set is not supported by GGUF export; llama.cpp would "
                "run it with its defaults (beta_fast 32, beta_slow 1, attention factor 0.1 ln(factor) + 1)"
            )
    return config, arch


def check_exportable(base: str, progress: Progress) -> None:
    """Before `qalign run` trains: refuse now a base model whose merged model could not be exported, rather
    than after hours of training. A hub model not in the local cache is checked after the merge instead."""
    folder = Path(base)
    if not (folder / "config.json").is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(base, "config.json")
        except Exception:  # an id the hub library cannot parse: loading the model reports it
            return
        if not isinstance(cached, str):
            return
        folder = Path(cached).parent
    config, _ = read_config(folder)
    # A hub cache may hold the config without the tokenizer yet; the export checks it after the merge then.
    if (folder / "tokenizer.json").is_file():
        read_vocab(folder, config["vocab_size"])
    progress.info(f"GGUF export: {base} can be exported")


def export_gguf(
    model_dir: Path,
    out: Path,
    quant: str,
    progress: Progress,
    overwrite: bool = False,
    provenance: str | None = None,
) -> Vocab:
    """Write ``model_dir`` as the GGUF file ``out`` in ``quant`` and the Modelfile beside it; ``provenance``
    (what the merged model was made from) is kept in the file under PROVENANCE_KEY."""
    import gguf

    if quant not in QUANTS:
        raise UserError(f"--quant {quant}: expected one of {', '.join(QUANTS)}")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it")
    config, arch = read_config(model_dir)
    vocab = read_vocab(model_dir, config["vocab_size"])
    tensors = _tensors(model_dir, config, arch)
    has_output = any(name == "output.weight" for name, _, _ in tensors)
    types = [
        tensor_type(name, shape, quant, config["num_hidden_layers"], has_output) for name, shape, _ in tensors
    ]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / tmp_name(out.name)
    writer = gguf.GGUFWriter(tmp, arch.gguf_name)
    try:
        _write_metadata(writer, config, arch, quant, out.stem)
        if provenance is not None:
            writer.add_string(PROVENANCE_KEY, provenance)
        write_vocab(writer, vocab)
        for (name, shape, _), qtype in zip(tensors, types, strict=True):
            # GGUF stores shapes innermost-first; the writer reverses numpy order itself.
            writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes(shape, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with progress.bar("gguf", total=len(tensors), start=0, unit="tensor") as bar:
            for i, ((name, _, load), qtype) in enumerate(zip(tensors, types, strict=True), 1):
                writer.write_tensor_data(quantize(load(), qtype))
                bar.update(i, {"tensor": name, "type": qtype.name})
        writer.close()
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    write_modelfile(out, vocab)
    return vocab


# Ollama does not run Jinja chat templates; it needs the turn format as a Go template. These cover the
# formats qalign's shipped recipes train with; for others Ollama falls back to the GGUF's own template.
_CHATML = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
_LLAMA3 = (
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
    "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)


def modelfile_text(gguf_name: str, vocab: Vocab) -> str:
    lines = [f"FROM ./{gguf_name}"]
    template = vocab.chat_template or ""
    if "<|im_start|>" in template:
        lines.append(f'TEMPLATE """{_CHATML}"""')
    elif "<|start_header_id|>" in template:
        lines.append(f'TEMPLATE """{_LLAMA3}"""')
    for stop in vocab.stop_words:
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    return "\n".join(lines) + "\n"


def modelfile_path(out: Path) -> Path:
    # One per GGUF file, so a q8_0 and a q4_k_m export can share a folder.
    return out.with_name(f"{out.stem}.Modelfile")


def write_modelfile(out: Path, vocab: Vocab) -> Path:
    path = modelfile_path(out)
    atomic_write_text(path, modelfile_text(out.name, vocab))
    return path


def how_to_run(out: Path) -> str:
    return (
        f"run it: ollama create {out.stem.lower()} -f {modelfile_path(out)} && ollama run {out.stem.lower()}"
        f"   or: llama-cli -m {out} -cnv"
    )


def merged_model(recipe: Recipe) -> Path:
    """The recipe's merged model, or a UserError saying to merge first."""
    merged = merged_folder(recipe)
    if not (merged / "config.json").is_file():
        raise UserError(
            f"{recipe.source} has no merged model yet (looked in {merged}); run `qalign merge {recipe.source}` "
            "first, then export again"
        )
    return merged


PROVENANCE_KEY = "qalign.merged_from"


def _provenance(merged: Path) -> str | None:
    """What the merged model was made from (base, adapter digest, dtype, base weights), from its merge report;
    the fidelity figures are left out since they vary with the hardware, not with the weights."""
    report = merged / "merge_report.json"
    if not report.is_file():
        return None
    facts = json.loads(report.read_text(encoding="utf-8"))
    facts.pop("fidelity", None)
    return json.dumps(facts, sort_keys=True)


def _exported_from(out: Path) -> str | None:
    import gguf

    try:
        field = gguf.GGUFReader(out).fields.get(PROVENANCE_KEY)
    except (OSError, ValueError):  # not a GGUF file, or a truncated one: write it again
        return None
    return None if field is None else str(field.contents())


def export_recipe(recipe: Recipe, progress: Progress) -> list[Path]:
    """`qalign run`'s last step: one GGUF file per `export.gguf` type. The run owns these files: one made
    from the same merge (same base, adapter and merge settings) is kept, any other is written again."""
    assert recipe.export is not None
    merged = merged_model(recipe)
    folder = gguf_folder(recipe)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", recipe.name)
    provenance = _provenance(merged)
    written = []
    for quant in recipe.export.gguf:
        out = folder / f"{stem}-{quant}.gguf"
        if provenance is not None and out.is_file() and _exported_from(out) == provenance:
            progress.info(f"{out}: already exported from this merge")
        else:
            export_gguf(merged, out, quant, progress, overwrite=True, provenance=provenance)
            progress.info(f"wrote {out} and {modelfile_path(out)}")
        written.append(out)
    if written:
        progress.info(how_to_run(written[-1]))
    return written
