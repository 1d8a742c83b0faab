"""Build the tiny byte-level BPE test tokenizer in tests/assets/tokenizer/.

Run from the repository root:

    .venv/bin/python tests/assets/build_tokenizer.py

The script is deterministic: it generates its own training text from fixed word
lists with a seeded RNG, trains a ~1000-token byte-level BPE with the
`tokenizers` library, and saves it with `transformers.PreTrainedTokenizerFast`.
Running it twice produces identical files.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
from pathlib import Path

# Single-threaded training keeps the merge order reproducible.
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAYON_NUM_THREADS"] = "1"

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "tokenizer"
TEMPLATES_DIR = HERE / "templates"

VOCAB_SIZE = 1000  # total, including the 256 byte symbols and the special tokens
SEED = 1234
N_DOCS = 4000

BOS = "<|begin_of_text|>"
EOS = "<|endoftext|>"
PAD = "<|pad|>"
# Order fixes the ids: these get ids 0..len-1.
SPECIAL_TOKENS = [
    EOS,
    PAD,
    BOS,
    "<|im_start|>",
    "<|im_end|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "[INST]",
    "[/INST]",
    "</s>",
]

# --------------------------------------------------------------------------- corpus

NAMES = [
    "Alice",
    "Bob",
    "Carol",
    "Dave",
    "Eve",
    "Frank",
    "Grace",
    "Heidi",
    "Ivan",
    "Judy",
    "Mallory",
    "Oscar",
]
ANIMALS = ["cat", "dog", "bird", "fish", "horse", "rabbit", "fox", "owl", "mouse", "bear", "wolf", "duck"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "brown", "gray"]
PLACES = [
    "the park",
    "the city",
    "the river",
    "the market",
    "the school",
    "the garden",
    "the forest",
    "the library",
    "the station",
    "the beach",
    "the kitchen",
    "the office",
]
OBJECTS = [
    "book",
    "apple",
    "letter",
    "table",
    "window",
    "computer",
    "car",
    "cup",
    "song",
    "picture",
    "house",
    "question",
    "answer",
    "story",
    "program",
    "file",
    "model",
    "number",
    "list",
    "word",
]
ADJS = [
    "small",
    "large",
    "quick",
    "slow",
    "happy",
    "sad",
    "bright",
    "dark",
    "old",
    "new",
    "simple",
    "careful",
    "strange",
    "quiet",
    "loud",
    "good",
    "bad",
    "short",
    "long",
    "useful",
]
VERBS_PAST = [
    "saw",
    "found",
    "liked",
    "wrote",
    "read",
    "opened",
    "closed",
    "painted",
    "bought",
    "sold",
    "made",
    "moved",
    "carried",
    "counted",
    "cleaned",
    "checked",
    "shared",
    "kept",
]
VERBS = [
    "write",
    "read",
    "explain",
    "describe",
    "list",
    "count",
    "summarize",
    "translate",
    "find",
    "check",
    "sort",
    "compare",
    "name",
    "give",
    "tell",
    "add",
    "help",
    "show",
]
TOPICS = [
    "the weather",
    "a recipe",
    "the history of ships",
    "prime numbers",
    "a short poem",
    "the moon",
    "a good breakfast",
    "the rules of chess",
    "a birthday party",
    "the water cycle",
    "a train trip",
    "learning to swim",
    "a small garden",
    "the number seven",
    "a rainy day",
]
ADVERBS = [
    "quickly",
    "slowly",
    "carefully",
    "often",
    "never",
    "always",
    "sometimes",
    "today",
    "yesterday",
    "again",
    "together",
    "very",
    "really",
    "also",
    "just",
]
CONNECT = ["and", "but", "so", "because", "then", "while", "although", "when", "after", "before"]
GREETINGS = [
    "Hello!",
    "Hi there.",
    "Good morning.",
    "Hey,",
    "Thanks!",
    "Thank you.",
    "Sure.",
    "Of course.",
    "Yes.",
    "No.",
    "Okay.",
    "Great question!",
    "Sorry,",
]


def _sentence(rng: random.Random) -> str:
    kind = rng.randrange(8)
    if kind == 0:
        return (
            f"The {rng.choice(ADJS)} {rng.choice(ANIMALS)} {rng.choice(VERBS_PAST)} a "
            f"{rng.choice(COLORS)} {rng.choice(OBJECTS)} in {rng.choice(PLACES)}."
        )
    if kind == 1:
        return (
            f"{rng.choice(NAMES)} {rng.choice(ADVERBS)} {rng.choice(VERBS_PAST)} the "
            f"{rng.choice(OBJECTS)}, {rng.choice(CONNECT)} {rng.choice(NAMES)} {rng.choice(VERBS_PAST)} "
            f"{rng.randint(2, 99)} of them."
        )
    if kind == 2:
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        op = rng.choice(["+", "-", "*"])
        res = a + b if op == "+" else a - b if op == "-" else a * b
        return f"What is {a} {op} {b}? The answer is {res}."
    if kind == 3:
        return (
            f"Is the {rng.choice(OBJECTS)} {rng.choice(COLORS)}? "
            f"{rng.choice(['Yes', 'No', 'Maybe'])}, it is {rng.choice(ADJS)}."
        )
    if kind == 4:
        return (
            f"In {rng.randint(1900, 2030)}, {rng.choice(NAMES)} went to {rng.choice(PLACES)} "
            f"with {rng.randint(1, 12)} friends; it took {rng.randint(1, 59)} minutes."
        )
    if kind == 5:
        return f'"{rng.choice(GREETINGS)}" said {rng.choice(NAMES)}. "I {rng.choice(VERBS_PAST)} it!"'
    if kind == 6:
        return (
            f"Please {rng.choice(VERBS)} {rng.choice(TOPICS)} in {rng.randint(1, 10)} "
            f"{rng.choice(['sentences', 'words', 'lines', 'steps'])}."
        )
    return (
        f"{rng.choice(GREETINGS)} The {rng.choice(OBJECTS)} costs ${rng.randint(1, 500)}."
        f"{rng.randint(0, 99):02d} ({rng.randint(1, 100)}% off)."
    )


def _document(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:  # plain prose paragraph(s)
        paras = [" ".join(_sentence(rng) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        return "\n\n".join(paras)
    if kind == 1:  # question / answer
        q = f"Question: Can you {rng.choice(VERBS)} {rng.choice(TOPICS)}?"
        a = "Answer: " + " ".join(_sentence(rng) for _ in range(rng.randint(1, 3)))
        return f"{q}\n{a}"
    if kind == 2:  # instruction with a numbered / bulleted list
        head = f"Instruction: {rng.choice(VERBS).capitalize()} {rng.choice(TOPICS)}.\nResponse:"
        bullet = rng.choice(["{i}.", "-", "*"])
        items = [f"{bullet.format(i=i + 1)} {_sentence(rng)}" for i in range(rng.randint(2, 5))]
        return head + "\n" + "\n".join(items)
    # small key: value record / code-ish snippet
    lines = [
        f"{rng.choice(['name', 'id', 'count', 'color', 'size', 'score'])}: "
        f"{rng.choice([str(rng.randint(0, 10000)), rng.choice(NAMES), rng.choice(COLORS)])}"
        for _ in range(rng.randint(2, 5))
    ]
    if rng.random() < 0.5:
        lines.append(f"def f(x):\n    return x * {rng.randint(2, 9)} + {rng.randint(0, 9)}")
    return "\n".join(lines)


def build_corpus(seed: int = SEED, n_docs: int = N_DOCS) -> list[str]:
    rng = random.Random(seed)
    return [_document(rng) for _ in range(n_docs)]


# --------------------------------------------------------------------------- build


def build(out_dir: Path = OUT_DIR) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())  # no unk token: byte-level covers every input
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = None  # never add BOS/EOS automatically
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(build_corpus(), trainer=trainer)

    chat_template = (TEMPLATES_DIR / "chatml.jinja").read_text(encoding="utf-8")
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (BOS, EOS, PAD)],
        model_max_length=2048,
        padding_side="right",
        truncation_side="right",
        clean_up_tokenization_spaces=False,
        chat_template=chat_template,
    )

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    # save_jinja_files=False keeps the default chat template inside tokenizer_config.json
    hf_tok.save_pretrained(str(out_dir), save_jinja_files=False)
    return hf_tok


def main() -> int:
    hf_tok = build()
    print(f"saved {len(hf_tok)} tokens to {OUT_DIR}")
    for t in SPECIAL_TOKENS:
        print(f"  {t!r}: {hf_tok.convert_tokens_to_ids(t)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
