"""Pretrain the demo's base model: a ~3M-parameter Llama that already writes the task's text but cannot chat.

It learns from plain text this script generates: equations (`3 + 4 = 7.`), questions answered in prose, word
problems, hedged guesses ("Hmm, I think 3 + 4 = 7, but I am not sure.") and simple English. The text never
contains the chat markup, so SFT has something visible to teach (answering a chat turn with an equation), and
it contains hedging, so the style DPO removes already exists in the base. Its byte-level BPE tokenizer is
trained on the same text and carries a ChatML chat template.

Deterministic (seeded, 2 threads, fixed step count); a few minutes on 2 CPU cores.

    python scripts/build_demo_model.py [OUT_DIR]      # default recipes/demo-model/
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_task import HEDGES, OPERANDS, PHRASINGS, PLAIN, score_format, split_pairs

OUT = Path(__file__).resolve().parent.parent / "recipes" / "demo-model"
SEED = 0
SPECIALS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]  # ids 0..3, in this order
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Model and training sizes: ~3M parameters (fp32 weights ~12 MB), ~2.5M training tokens (1200 batches of 32 x 64).
VOCAB, HIDDEN, LAYERS, HEADS, INTERMEDIATE = 1024, 256, 4, 4, 576
DOCS, WINDOW, BATCH, STEPS, LR = 40_000, 64, 32, 1200, 2e-3

NAMES = ("Anna", "Ben", "Cara", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivy", "Jack", "Kim", "Leo", "Mia",
         "Ned", "Olga", "Pia", "Ravi", "Sam", "Tom", "Uma", "Vera", "Will", "Yuki", "Zoe")  # fmt: skip
THINGS = ("apples", "pens", "books", "cats", "cups", "coins", "stones", "shells", "cards", "eggs", "birds",
          "boats", "stars", "hats", "pears", "ducks", "kites", "plums", "shoes", "toys")  # fmt: skip
PLACES = ("the park", "the school", "the market", "the garden", "the river", "the shop", "the library",
          "the beach", "the farm", "the station")  # fmt: skip
SENTENCES = (
    "{n} walked to {p} in the morning.",
    "{n} likes {t} more than anything.",
    "The weather was cold, so {n} stayed near {p}.",
    "{n} and {m} are good friends.",
    "After lunch, {n} read a book about {t}.",
    "{n} asked {m} a question about numbers.",
    "It was a quiet day at {p}.",
    "{n} counted the {t} slowly and carefully.",
    "Some people check their answers twice.",
    "The teacher wrote a sum on the board.",
    "Adding two numbers gives their total.",
    "{n} was not sure, so {n} asked the teacher.",
)


def document(rng: random.Random) -> str:
    """One plain-text document; never chat markup. Every sum in it is right."""
    a, b = rng.choice(OPERANDS), rng.choice(OPERANDS)
    c, n, m = a + b, rng.choice(NAMES), rng.choice(NAMES)
    t, p = rng.choice(THINGS), rng.choice(PLACES)
    question = rng.choice(PHRASINGS).format(a=a, b=b)
    kind = rng.random()
    if kind < 0.30:  # the answer format, alone or as a worksheet line (also right after a newline)
        lines = [PLAIN.format(a=a, b=b, c=c)]
        for _ in range(rng.randrange(3)):
            x, y = rng.choice(OPERANDS), rng.choice(OPERANDS)
            lines.append(PLAIN.format(a=x, b=y, c=x + y))
        return rng.choice((" ", "\n")).join(lines)
    if kind < 0.50:  # a question answered in prose, restating the operands (copying them is the skill)
        return rng.choice(
            (
                f"{question} The answer is {c}. So {a} + {b} = {c}.",
                f"{n} asked: {question} {m} said that {a} + {b} = {c}.",
                f"{question} We add {a} and {b} and get {c}, because {a} + {b} = {c}.",
            )
        )
    if kind < 0.65:  # hedged, rambling guesses: the style DPO will remove after SFT picks it up
        hedge = rng.choice(HEDGES).format(a=a, b=b, c=c)
        return rng.choice((hedge, f"{n} asked: {question} {m} said: {hedge}"))
    if kind < 0.85:  # word problems
        return rng.choice(
            (
                f"{n} has {a} {t}. {m} gives {n} {b} more. Now {n} has {c} {t}.",
                f"At {p}, {n} found {a} {t} and then {b} more, so {a} + {b} = {c} {t} in all.",
                f"{n} had {a} {t} and {m} had {b}. Together they had {c}.",
            )
        )
    return " ".join(rng.choice(SENTENCES).format(n=n, m=m, t=t, p=p) for _ in range(rng.randrange(1, 4)))


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style pre-tokenization, so numbers and words stay separate tokens); no BOS."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=256,
    )
    fast.chat_template = CHATML
    return fast


def pretrain(model: LlamaForCausalLM, stream: list[int]) -> float:
    """Plain fp32 AdamW on random windows of the packed token stream; returns the mean loss of the last 50."""
    data = torch.tensor(stream[: len(stream) // WINDOW * WINDOW]).view(-1, WINDOW)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, total_steps=STEPS, pct_start=0.05)
    generator = torch.Generator().manual_seed(SEED)
    losses: list[float] = []
    model.train()
    started = time.perf_counter()
    for step in range(STEPS):
        rows = data[torch.randint(len(data), (BATCH,), generator=generator)]
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 100 == 0 or step == STEPS - 1:
            print(
                f"step {step:4d}  loss {loss.item():.3f}  {time.perf_counter() - started:5.0f} s", flush=True
            )
    model.eval()
    return sum(losses[-50:]) / 50


@torch.no_grad()
def complete(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, ids: list[int], n: int = 16) -> str:
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")],
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


def evaluate(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    """What the base can do before any fine-tuning: finish equations, but not answer a chat turn."""
    right = sum(
        complete(model, tokenizer, tokenizer(f"{a} + {b} =")["input_ids"], 4).strip().startswith(f"{a + b}.")
        for a in OPERANDS
        for b in OPERANDS
    )
    print(f"equation completion ('a + b =' -> ' c.'), all 100 sums: {right}/100")
    for text in ("7 + 1 =", "5 + 2 =", "What is 7 + 1?", "Hmm, I think"):
        print(f"  {text!r} -> {complete(model, tokenizer, tokenizer(text)['input_ids'])!r}")

    def chat(prompt: str) -> list[int]:
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]

    for prompt in ("What is 7 + 1?", "Add 8 and 5."):
        print(f"  chat {prompt!r} -> {complete(model, tokenizer, chat(prompt))!r}")
    # Like the demo table's base row: how often a chat prompt about a held-out operand pair gets its equation.
    prompts = [phrasing.format(a=a, b=b) for a, b in split_pairs()[2] for phrasing in PHRASINGS[:2]]
    formatted = sum(score_format(p, complete(model, tokenizer, chat(p))) for p in prompts)
    print(f"chat answers in the task's format (base, {len(prompts)} held-out prompts): {formatted}")


def main(out: Path = OUT) -> None:
    started = time.perf_counter()
    random.seed(SEED)
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    rng = random.Random(SEED)
    texts = [document(rng) for _ in range(DOCS)]
    tokenizer = build_tokenizer(texts)
    assert tokenizer.convert_tokens_to_ids(SPECIALS) == [0, 1, 2, 3]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=256,
        tie_word_embeddings=True,  # the embedding doubles as the output layer: fewer parameters to store
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    # Documents packed into one token stream, each followed by EOS (so the model learns to stop).
    stream: list[int] = []
    for ids in tokenizer(texts)["input_ids"]:
        stream += [*ids, tokenizer.eos_token_id]
    params = sum(p.numel() for p in model.parameters())
    print(f"{params:,} parameters, vocabulary {len(tokenizer)}, {len(stream):,} tokens of text", flush=True)
    final_loss = pretrain(model, stream)
    print(f"final loss (mean of the last 50 steps): {final_loss:.3f}")
    evaluate(model, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    print(f"wrote {out} ({size:.1f} MB) in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
