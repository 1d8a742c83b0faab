"""The demo's task: a tiny arithmetic assistant whose two alignment stages each have an honest, automatic
measure. Standard library only, so the report, the tests and the pretraining script can all import it.

- The base model (scripts/build_demo_model.py) is pretrained on plain text: it completes `5 + 2 =` with
  ` 7.`, but it has never seen a chat turn.
- SFT teaches the answer format: asked "What is 3 + 4?" in a chat turn, answer with the equation
  `3 + 4 = 7.`. Most demonstrations (SFT_HEDGE_SHARE) wrap the equation in a hedge ("I think 3 + 4 = 7, but
  I am not sure."), so the SFT model answers with the equation but usually hedges. Measured by
  `score_format`.
- DPO teaches a preference: the pairs prefer the plain, correct equation over a hedged or rambling one, and
  over a plain one with a wrong sum or a wrong operand. Measured by `score_preferred`. The KTO files hold the
  same pairs unpaired (recipes/demo-kto.yaml): each chosen answer a desirable row, each rejected one not.

The prompts held out for the demo's final table use operand pairs that no training file contains.
`python scripts/demo_task.py [OUT_DIR]` writes the data (default recipes/data/), identically on every run.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

SEED = 0
# Operands are 0..9, so there are 100 sums; the base model is pretrained on all of them (it knows addition),
# while SFT and DPO see only the TRAIN_PAIRS, and the held-out prompts ask about operand pairs they never saw.
OPERANDS = range(10)
TRAIN_PAIRS, EVAL_PAIRS, HELDOUT_PAIRS = 70, 5, 25
HELDOUT_PHRASINGS = 2  # each held-out pair asked in two different phrasings: 50 prompts
PHRASINGS = ("What is {a} + {b}?", "Compute {a} + {b}.", "How much is {a} plus {b}?", "Add {a} and {b}.")
PLAIN = "{a} + {b} = {c}."
# The one hedge SFT demonstrates; with SFT_HEDGE_SHARE above one half it is the SFT model's greedy answer,
# which gives DPO something measurable to remove.
SFT_HEDGE = "I think {a} + {b} = {c}, but I am not sure."
SFT_HEDGE_SHARE = 0.6
# More rambling for DPO's rejected answers and for the pretraining text (the style exists in the base).
HEDGES = (
    SFT_HEDGE,
    "Hmm, I think {a} + {b} = {c}, but I am not sure.",
    "Well, let me think. Maybe {a} + {b} = {c}? I could be wrong.",
    "I believe {a} + {b} = {c}, probably.",
    "Let me think about it. I guess {a} + {b} = {c}, but maybe not.",
)
# Share of DPO pairs whose rejected answer is plain but wrong (a wrong sum or a wrong first operand), so
# that DPO learns to keep the equation right while it drops the hedging.
DPO_WRONG_SHARE = 0.25
FILES = {
    "sft_train": "demo_sft_train.jsonl",
    "sft_eval": "demo_sft_eval.jsonl",
    "dpo_train": "demo_dpo_train.jsonl",
    "dpo_eval": "demo_dpo_eval.jsonl",
    "heldout": "demo_heldout.jsonl",
    "kto_train": "demo_kto_train.jsonl",
    "kto_eval": "demo_kto_eval.jsonl",
}
DATA_DIR = Path(__file__).resolve().parent.parent / "recipes" / "data"

_NUMBERS = re.compile(r"(\d+)\D+?(\d+)")
_EQUATION = re.compile(r"(\d+) \+ (\d+) = (\d+)")
_PLAIN = re.compile(r"(\d+) \+ (\d+) = (\d+)\.")
HEDGE_WORDS = ("think", "maybe", "not sure", "believe", "probably", "wrong", "guess", "hmm", "well")


def operands(prompt: str) -> tuple[int, int]:
    """The two numbers a prompt asks to add (the first two integers in it)."""
    match = _NUMBERS.search(prompt)
    if not match:
        raise ValueError(f"no two numbers in prompt {prompt!r}")
    return int(match.group(1)), int(match.group(2))


def _first_equation(reply: str) -> tuple[int, int, int] | None:
    match = _EQUATION.search(reply)
    return (int(match.group(1)), int(match.group(2)), int(match.group(3))) if match else None


def score_format(prompt: str, reply: str) -> bool:
    """SFT's task: the reply answers with an equation `a + b = c` about the prompt's own operands, in order.

    Only the first equation in the reply counts. The sum may be wrong and the equation may be hedged ("I think
    3 + 4 = 7, but I am not sure." is formatted): the format is what SFT teaches, the rest is DPO's.
    """
    equation = _first_equation(reply)
    return equation is not None and equation[:2] == operands(prompt)


def score_correct(prompt: str, reply: str) -> bool:
    """The reply's first equation is about the prompt's operands and gives their right sum (hedged or not)."""
    equation = _first_equation(reply)
    a, b = operands(prompt)
    return equation == (a, b, a + b)


def score_hedged(reply: str) -> bool:
    """The reply hedges or rambles: it contains one of HEDGE_WORDS (case-insensitive)."""
    lowered = reply.lower()
    return any(word in lowered for word in HEDGE_WORDS)


def score_preferred(prompt: str, reply: str) -> bool:
    """DPO's preference: the reply is exactly the plain, correct equation `a + b = c.` and nothing else.

    Leading and trailing whitespace is ignored; any other word (a hedge, a second sentence) fails it.
    """
    a, b = operands(prompt)
    match = _PLAIN.fullmatch(reply.strip())
    return match is not None and (int(match.group(1)), int(match.group(2)), int(match.group(3))) == (
        a,
        b,
        a + b,
    )


# The names scripts/demo_report.py and tests/test_demo_task.py use.
is_formatted = score_format
is_correct = score_correct
is_hedged = score_hedged
is_preferred = score_preferred


def split_pairs(seed: int = SEED) -> tuple[list[tuple[int, int]], ...]:
    """The 100 operand pairs shuffled and cut into disjoint train, eval and held-out pairs."""
    pairs = [(a, b) for a in OPERANDS for b in OPERANDS]
    random.Random(seed).shuffle(pairs)
    cut1, cut2 = TRAIN_PAIRS, TRAIN_PAIRS + EVAL_PAIRS
    return pairs[:cut1], pairs[cut1:cut2], pairs[cut2 : cut2 + HELDOUT_PAIRS]


def _sft_rows(rng: random.Random, pairs: list[tuple[int, int]]) -> list[dict]:
    """Every pair in every phrasing once; SFT_HEDGE_SHARE of the replies hedged (still correct)."""
    rows = []
    for a, b in pairs:
        for phrasing in PHRASINGS:
            template = SFT_HEDGE if rng.random() < SFT_HEDGE_SHARE else PLAIN
            reply = template.format(a=a, b=b, c=a + b)
            messages = [
                {"role": "user", "content": phrasing.format(a=a, b=b)},
                {"role": "assistant", "content": reply},
            ]
            rows.append({"messages": messages})
    rng.shuffle(rows)
    return rows


def _rejected(rng: random.Random, a: int, b: int) -> str:
    """A dispreferred answer: usually a correct but hedged one, sometimes a plain one that is wrong."""
    if rng.random() >= DPO_WRONG_SHARE:
        return rng.choice(HEDGES).format(a=a, b=b, c=a + b)
    if rng.random() < 0.5:  # off by one or two, never negative
        wrong_sum = a + b + rng.choice([d for d in (-2, -1, 1, 2) if a + b + d >= 0])
        return PLAIN.format(a=a, b=b, c=wrong_sum)
    wrong_a = rng.choice([x for x in OPERANDS if x != a])  # restates the wrong operand, with its true sum
    return PLAIN.format(a=wrong_a, b=b, c=wrong_a + b)


def _dpo_rows(rng: random.Random, pairs: list[tuple[int, int]], copies: int) -> list[dict]:
    rows = []
    for a, b in pairs * copies:
        prompt = rng.choice(PHRASINGS).format(a=a, b=b)
        rows.append(
            {"prompt": prompt, "chosen": PLAIN.format(a=a, b=b, c=a + b), "rejected": _rejected(rng, a, b)}
        )
    rng.shuffle(rows)
    return rows


def _kto_rows(pairs: list[dict]) -> list[dict]:
    """KTO's unpaired rows from the DPO pairs: each pair's chosen answer as a desirable row, then its rejected
    one as an undesirable row (no new draws, so the other files stay as they were)."""
    rows = []
    for pair in pairs:
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    return rows


def build(out_dir: Path | str = DATA_DIR, seed: int = SEED) -> dict[str, int]:
    """Write the data files (see FILES) into out_dir; return the row count of each."""
    rng = random.Random(seed)
    train, evals, heldout = split_pairs(seed)
    heldout_prompts = []
    for a, b in heldout:
        for phrasing in rng.sample(PHRASINGS, HELDOUT_PHRASINGS):
            heldout_prompts.append({"prompt": phrasing.format(a=a, b=b)})
    files = {
        FILES["sft_train"]: _sft_rows(rng, train),  # 280 conversations
        FILES["sft_eval"]: _sft_rows(rng, evals),  # 20
        FILES["dpo_train"]: _dpo_rows(rng, train, 3),  # 210 pairs
        FILES["dpo_eval"]: _dpo_rows(rng, evals, 4),  # 20
        FILES["heldout"]: heldout_prompts,  # 50 prompts
    }
    files[FILES["kto_train"]] = _kto_rows(files[FILES["dpo_train"]])  # 420 rows
    files[FILES["kto_eval"]] = _kto_rows(files[FILES["dpo_eval"]])  # 40
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        text = "".join(json.dumps(row) + "\n" for row in rows)
        (out / name).write_text(text, encoding="utf-8")
    return {name: len(rows) for name, rows in files.items()}


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DATA_DIR
    for name, count in build(target).items():
        print(f"{target / name}: {count} rows")
