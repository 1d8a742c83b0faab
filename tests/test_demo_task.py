"""The demo's scoring functions, checked by hand, and its data files, checked for leaks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from demo_task import is_correct, is_formatted, is_hedged, is_preferred, operands  # noqa: E402


def test_scores_by_hand():
    prompt = "What is 3 + 4?"
    assert operands("How much is 3 plus 4?") == (3, 4)
    assert (
        is_formatted(prompt, "3 + 4 = 7.")
        and is_correct(prompt, "3 + 4 = 7.")
        and is_preferred(prompt, "3 + 4 = 7.")
    )
    assert is_formatted(prompt, "3 + 4 = 8.") and not is_correct(prompt, "3 + 4 = 8.")
    assert not is_formatted(prompt, "5 + 4 = 9.")  # about other numbers
    hedged = "Hmm, I think 3 + 4 = 7, but I am not sure."
    assert is_correct(prompt, hedged) and is_hedged(hedged) and is_formatted(prompt, hedged)
    assert not is_preferred(prompt, hedged)
    assert not is_formatted(prompt, "The answer is 7.") and not is_correct(prompt, "The answer is 17.")


def test_heldout_prompts_never_appear_in_training_data():
    data = ROOT / "recipes" / "data"
    heldout = {
        operands(json.loads(line)["prompt"])
        for line in (data / "demo_heldout.jsonl").read_text().splitlines()
    }
    trained = set()
    for line in (data / "demo_sft_train.jsonl").read_text().splitlines():
        trained.add(operands(json.loads(line)["messages"][0]["content"]))
    for name in ("demo_dpo_train.jsonl", "demo_kto_train.jsonl"):
        for line in (data / name).read_text().splitlines():
            trained.add(operands(json.loads(line)["prompt"]))
    assert heldout and not heldout & trained
