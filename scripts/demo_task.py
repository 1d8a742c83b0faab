"""The demo's task: a tiny arithmetic assistant whose two alignment stages each have an honest, automatic
measure.

- SFT teaches the answer format: the pretrained base only continues text; after SFT it answers a chat turn
  with `a + b = c.`. Measured by `is_formatted`.
- DPO teaches a preference: most SFT demonstrations hedge ("I think a + b = c, but I am not sure."), so the
  SFT model hedges; the preference pairs prefer the plain answer, and DPO should make hedging rare. Measured
  by `is_preferred` (exactly the plain, correct equation).

`python scripts/demo_task.py` writes the data into recipes/data/ deterministically.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

PHRASINGS = ("What is {a} + {b}?", "Compute {a} + {b}.", "How much is {a} plus {b}?", "Add {a} and {b}.")
HEDGES = (
    "Hmm, I think {a} + {b} = {c}, but I am not sure.",
    "Well, let me think. Maybe {a} + {b} = {c}? I could be wrong.",
    "I believe {a} + {b} = {c}, probably.",
)
SFT_HEDGE = "I think {a} + {b} = {c}, but I am not sure."
SFT_HEDGE_SHARE = 0.6
EQUATION = re.compile(r"(\d+) \+ (\d+) = (\d+)")
PLAIN = re.compile(r"^\s*(\d+) \+ (\d+) = (\d+)\.\s*$")
NUMBERS = re.compile(r"(\d+)\D+(\d+)")
HEDGE_WORDS = ("think", "maybe", "not sure", "believe", "probably", "wrong", "hmm", "well")


def operands(prompt: str) -> tuple[int, int]:
    match = NUMBERS.search(prompt)
    assert match, prompt
    return int(match.group(1)), int(match.group(2))


def is_formatted(prompt: str, reply: str) -> bool:
    """The reply answers with an equation `a + b = c` about the prompt's numbers (right or wrong, hedged or not)."""
    match = EQUATION.search(reply)
    return bool(match) and (int(match.group(1)), int(match.group(2))) == operands(prompt)


def is_correct(prompt: str, reply: str) -> bool:
    """The reply states the right sum somewhere as `= c`."""
    a, b = operands(prompt)
    return re.search(rf"=\s*{a + b}\b", reply) is not None


def is_hedged(reply: str) -> bool:
    lowered = reply.lower()
    return any(word in lowered for word in HEDGE_WORDS)


def is_preferred(prompt: str, reply: str) -> bool:
    """What DPO is asked to teach: the plain, correct, unhedged equation."""
    match = PLAIN.match(reply)
    return bool(match) and is_formatted(prompt, reply) and is_correct(prompt, reply) and not is_hedged(reply)


def _pairs(rng: random.Random) -> list[tuple[int, int]]:
    pairs = [(a, b) for a in range(10) for b in range(10)]
    rng.shuffle(pairs)
    return pairs


def build(out: Path, seed: int = 0) -> None:
    rng = random.Random(seed)
    pairs = _pairs(rng)
    # 100 operand pairs: 70 for training, 10 for eval, 20 held out for the final table (never trained on).
    train, evals, heldout = pairs[:70], pairs[70:80], pairs[80:]

    def prompt(a: int, b: int) -> str:
        return rng.choice(PHRASINGS).format(a=a, b=b)

    def sft_rows(ops: list, copies: int) -> list[dict]:
        rows = []
        for a, b in ops * copies:
            reply = f"{a} + {b} = {a + b}."
            if rng.random() < SFT_HEDGE_SHARE:
                reply = SFT_HEDGE.format(a=a, b=b, c=a + b)
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": prompt(a, b)},
                        {"role": "assistant", "content": reply},
                    ]
                }
            )
        rng.shuffle(rows)
        return rows

    def dpo_rows(ops: list, copies: int) -> list[dict]:
        rows = []
        for a, b in ops * copies:
            rejected = rng.choice((SFT_HEDGE, *HEDGES)).format(a=a, b=b, c=a + b)
            rows.append({"prompt": prompt(a, b), "chosen": f"{a} + {b} = {a + b}.", "rejected": rejected})
        rng.shuffle(rows)
        return rows

    out.mkdir(parents=True, exist_ok=True)
    files = {
        "demo_sft_train.jsonl": sft_rows(train, 4),
        "demo_sft_eval.jsonl": sft_rows(evals, 1),
        "demo_dpo_train.jsonl": dpo_rows(train, 3),
        "demo_dpo_eval.jsonl": dpo_rows(evals, 2),
        "demo_heldout.jsonl": [{"prompt": prompt(a, b)} for a, b in heldout for _ in range(2)],
    }
    for name, rows in files.items():
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    build(Path(__file__).resolve().parent.parent / "recipes" / "data")
