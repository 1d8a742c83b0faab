"""The demo's before/after table: the base, the SFT model and the DPO model answer the held-out prompts
(never trained on), and programs score the answers. Every number comes from running the models.

    python scripts/demo_report.py recipes/demo.yaml
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_task import is_correct, is_formatted, is_hedged, is_preferred  # noqa: E402


def answers(model, tokenizer, prompts: list[str], stop: list[int]) -> list[str]:
    out = []
    with torch.inference_mode():
        for prompt in prompts:
            inputs = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
            )
            ids = model.generate(**inputs, max_new_tokens=24, do_sample=False, eos_token_id=stop,
                                 pad_token_id=tokenizer.pad_token_id)  # fmt: skip
            out.append(
                tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
            )
    return out


def main(recipe_path: str, overrides: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Print the tables; return the rates by model and metric (for tests)."""
    import warnings

    import transformers
    from peft import PeftModel
    from transformers import AutoTokenizer

    # Library chatter would bury the table.
    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    from qalign.chat_template import end_of_turn_id
    from qalign.model import load_base, pick_device
    from qalign.recipe_load import load_recipe

    console = Console()
    recipe = load_recipe(recipe_path, overrides)
    heldout = recipe.source.parent / "data" / "demo_heldout.jsonl"
    prompts = [json.loads(line)["prompt"] for line in heldout.read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(recipe.out / "sft" / "adapter")
    stop = [t for t in (tokenizer.eos_token_id, end_of_turn_id(tokenizer)) if t is not None]
    model = PeftModel.from_pretrained(
        load_base(recipe.model, pick_device()), recipe.out / "sft" / "adapter", "sft"
    )
    model.load_adapter(str(recipe.out / "dpo" / "adapter"), adapter_name="dpo")
    model.eval()

    results = {}
    console.print(f"scoring {len(prompts)} held-out prompts (greedy decoding), once per model:")
    with model.disable_adapter():
        console.print("  the base model")
        results["base"] = answers(model, tokenizer, prompts, stop)
    for stage in ("sft", "dpo"):
        console.print(f"  after {stage.upper()}")
        model.set_adapter(stage)
        results[f"after {stage.upper()}"] = answers(model, tokenizer, prompts, stop)

    table = Table(title=f"Held-out prompts ({len(prompts)}, never trained on), greedy decoding")
    table.add_column("model")
    for column in (
        "answer format (SFT's task)",
        "correct sum",
        "hedged",
        "plain & correct (DPO's preference)",
    ):
        table.add_column(column, justify="right")
    checks = {
        "format": is_formatted,
        "correct": is_correct,
        "hedged": lambda p, r: is_hedged(r),
        "preferred": is_preferred,
    }
    rates: dict[str, dict[str, float]] = {}
    for name, replies in results.items():
        pairs = list(zip(prompts, replies, strict=True))
        rates[name] = {key: sum(check(p, r) for p, r in pairs) / len(pairs) for key, check in checks.items()}
        table.add_row(name, *(f"{rates[name][key]:.0%}" for key in checks))
    console.print(table)

    samples = Table(title="Sample answers")
    samples.add_column("prompt")
    for name in results:
        samples.add_column(name)
    for i in (0, 7, 15):
        samples.add_row(prompts[i], *(repr(results[name][i]) for name in results))
    console.print(samples)
    return rates


if __name__ == "__main__":
    # python scripts/demo_report.py [RECIPE] [KEY=VALUE ...]: the same overrides as qalign's --set.
    main(sys.argv[1] if len(sys.argv) > 1 else "recipes/demo.yaml", sys.argv[2:])
