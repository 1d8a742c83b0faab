"""Reading a recipe: YAML in, a validated Recipe (qalign/recipe.py's schema) out.

Unknown keys are errors (with a did-you-mean that knows other tools' names), every error names the file and line
of the offending key, relative paths resolve against the recipe's folder, and any key can be overridden with
`--set a.b=value`.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from qalign.errors import UserError
from qalign.recipe import DpoSpec, Recipe


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
        ("rpo_alpha", dpo.loss not in ("sigmoid", "ipo", "hinge"), "the sigmoid, ipo and hinge losses"),
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
