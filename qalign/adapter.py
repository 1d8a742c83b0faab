"""The finished adapter folder: peft's files, the tokenizer training used, and qalign's own record of the run.

adapter_config.json, adapter_model.safetensors   peft's format: any peft user can load the adapter
tokenizer files                                    with the chat template the rows were rendered with
generation_config.json                             stops at the template's end-of-turn token too
qalign.json                                        how the base was loaded (merge and chat rebuild it), and
                                                   the run's identity and data digest (re-runs compare them)
README.md                                          a short model card: base, data, steps, final losses
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from qalign.atomic import atomic_dir
from qalign.errors import UserError

METADATA = "qalign.json"


@dataclass
class TrainedAs:
    """How the base was loaded for training (from the adapter's qalign.json, or the recipe)."""

    base: str
    quantization: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "fp32"
    revision: str | None = None
    trust_remote_code: bool = False

    @classmethod
    def from_adapter(cls, adapter: Path, base: str | None = None) -> TrainedAs:
        meta = read_metadata(adapter)
        config = json.loads((adapter / "adapter_config.json").read_text())
        base = base or meta.get("base") or config.get("base_model_name_or_path")
        if not base:
            raise UserError(f"{adapter}: the adapter does not say which base it belongs to; pass --base")
        fields = ("quantization", "double_quant", "compute_dtype", "revision", "trust_remote_code")
        return cls(base=base, **{k: meta[k] for k in fields if k in meta})


def read_metadata(adapter: Path) -> dict:
    """qalign.json of an adapter folder; empty for adapters made elsewhere (or unreadable ones)."""
    try:
        meta = json.loads((adapter / METADATA).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def adapter_digest(adapter: Path) -> str:
    """Identifies an adapter by its config and weights (not by its path or its qalign.json)."""
    digest = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        digest.update((adapter / name).read_bytes())
    return digest.hexdigest()[:20]


def save_adapter(
    model: torch.nn.Module,
    tokenizer: object,
    target: Path,
    metadata: dict,
    card: str,
    weights: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write the finished adapter atomically, replacing an earlier one only once the new one is complete.
    `weights`: the trainable weights gathered whole, when the model is sharded over processes."""
    with atomic_dir(target, replace=target.exists()) as folder:
        model.save_pretrained(str(folder), selected_adapters=["default"], state_dict=weights)
        tokenizer.save_pretrained(str(folder))
        generation = _generation_config(model, tokenizer)
        if generation is not None:
            generation.save_pretrained(str(folder))
        (folder / METADATA).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        # peft writes an empty model-card template; this one says what the adapter is.
        (folder / "README.md").write_text(card, encoding="utf-8")


def _generation_config(model: torch.nn.Module, tokenizer: object) -> object | None:
    """The base's generation config, stopping at every id that ends an assistant turn (e.g. <|im_end|> where
    the tokenizer's EOS is <|endoftext|>), so plain peft generation stops where `qalign chat` does."""
    import copy

    from qalign.chat_template import end_of_turn_id

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "generation_config", None)
    if config is None:
        return None
    config = copy.deepcopy(config)
    eos = config.eos_token_id
    ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    for token in (tokenizer.eos_token_id, end_of_turn_id(tokenizer)):
        if token is not None and token not in ids:
            ids.append(token)
    config.eos_token_id = ids[0] if len(ids) == 1 else (ids or None)
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    return config


def model_card(metadata: dict, final: dict) -> str:
    """A short README for the adapter folder."""
    lines = [
        f"# {metadata.get('name', 'qalign adapter')}: {metadata['stage']} adapter",
        "",
        f"A LoRA adapter trained by qalign {metadata['qalign']} ({metadata['stage']}) on a "
        f"{metadata['quantization']} 4-bit base."
        if metadata["quantization"] != "none"
        else f"A LoRA adapter trained by qalign {metadata['qalign']} ({metadata['stage']}).",
        "",
        f"- base: `{metadata['base']}`"
        + (f" (revision `{metadata['revision']}`)" if metadata.get("revision") else ""),
        f"- compute dtype: {metadata['compute_dtype']}",
    ]
    if metadata.get("data"):
        lines.append(f"- data: `{metadata['data']}`")
    if metadata.get("started_from"):
        lines.append(f"- started from: `{metadata['started_from']}`")
    for key in ("step", "loss", "eval_loss", "rewards/accuracy", "rewards/margin"):
        if key in final:
            value = final[key]
            lines.append(f"- final {key}: {value:.4f}" if isinstance(value, float) else f"- {key}: {value}")
    lines += [
        "",
        "Load it with peft (`PeftModel.from_pretrained(base, this_folder)`), talk to it with "
        "`qalign chat <this folder>`, or fold it into the base with `qalign merge --adapter <this folder>`.",
        "",
    ]
    return "\n".join(lines)
