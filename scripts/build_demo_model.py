"""Pretrain the demo's base model: a ~1M-parameter Llama that already writes the task's text.

It learns from plain text this script generates (sums written as equations and in prose, some of it hedged),
never from the chat format, so SFT has something visible to teach (answering a chat turn) and DPO something
visible to remove (hedging). Deterministic; a few minutes on 2 CPU cores. Writes recipes/demo-model/.

    python scripts/build_demo_model.py
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_task import HEDGES, PHRASINGS

OUT = Path(__file__).resolve().parent.parent / "recipes" / "demo-model"
SPECIALS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
FILLER = (
    "Numbers are fun to add.",
    "We can count on our fingers.",
    "The teacher wrote a sum on the board.",
    "Adding two numbers gives their total.",
    "Some people check their answers twice.",
    "The class practised sums every morning.",
)


def corpus(rng: random.Random, n: int) -> list[str]:
    """Plain documents: equations, questions answered in prose, hedged answers; no chat markup."""
    docs = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        kind = rng.random()
        if kind < 0.4:
            docs.append(f"{a} + {b} = {a + b}.")
        elif kind < 0.65:
            question = rng.choice(PHRASINGS).format(a=a, b=b)
            docs.append(f"{question} The answer is {a + b}. So {a} + {b} = {a + b}.")
        elif kind < 0.85:
            docs.append(rng.choice(HEDGES).format(a=a, b=b, c=a + b))
        else:
            docs.append(f"{rng.choice(FILLER)} {a} plus {b} makes {a + b}.")
    return docs


def build_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
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


def main() -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    started = time.perf_counter()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    rng = random.Random(0)
    texts = corpus(rng, 20_000)
    tokenizer = build_tokenizer(texts)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = AutoModelForCausalLM.from_config(config)
    # Documents packed into one token stream, separated by EOS, cut into fixed windows.
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    window, batch, steps = 64, 32, 900
    data = torch.tensor(stream[: len(stream) // window * window]).view(-1, window)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    model.train()
    for step in range(steps):
        rows = data[torch.randint(len(data), (batch,))]
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.3f}", flush=True)
    model.eval()
    correct = 0
    with torch.no_grad():
        for a in range(10):
            for b in range(10):
                ids = tokenizer(f"{a} + {b} =", return_tensors="pt")["input_ids"]
                out = model.generate(
                    ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
                correct += tokenizer.decode(out[0, ids.shape[1] :]).strip().startswith(f"{a + b}.")
    OUT.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(OUT, safe_serialization=True)
    tokenizer.save_pretrained(OUT)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"{params:,} parameters; 'a + b =' completed correctly {correct}/100; {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
