"""render_conversation: which tokens are trained, for three template styles and for templates that end turns
in plain text, rewrite history or refuse a conversation; one BOS; ids from one tokenization."""

from __future__ import annotations

import pytest
from conftest import TEMPLATES, TOKENIZER

from qalign.chat_template import IGNORE, render_conversation
from qalign.errors import UserError

STYLES = ("chatml", "llama3", "mistral")
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": "</s>"}
BOS = "<|begin_of_text|>"
EOS = "<|endoftext|>"

SYSTEM = "Answer in one short sentence."
CONVERSATIONS = {
    "single": [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "The answer is 5."},
    ],
    "system-two-turns": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "The answer is 5."},
        {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": "It is 8."},
    ],
    "three-turns": [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Green, like grass."},
        {"role": "user", "content": "And a third?"},
        {"role": "assistant", "content": "Red: apples, roses and fire trucks!"},
    ],
}

# Assistant turns end in plain text: no special token closes them.
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:\n{% endif %}"
)
# Rewrites history: earlier assistant turns are shown as "..." once a later turn follows.
HIDING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and not loop.last %}...{% else %}{{ m['content'] }}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def load_tokenizer(template: str | None = None, adds_bos: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    if template is not None:
        tokenizer.chat_template = (TEMPLATES / f"{template}.jinja").read_text(encoding="utf-8")
    if adds_bos:
        from tokenizers.processors import TemplateProcessing

        tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
            single=f"{BOS} $A",
            pair=f"{BOS} $A $B",
            special_tokens=[(BOS, tokenizer.bos_token_id)],
        )
    return tokenizer


def trained_runs(tokenizer, rendered) -> list[str]:
    """Decoded maximal runs of consecutive trained tokens."""
    runs, current = [], []
    for token, label in zip(rendered.input_ids, rendered.labels, strict=True):
        if label != IGNORE:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def untrained_text(tokenizer, rendered) -> str:
    return tokenizer.decode(
        [t for t, label in zip(rendered.input_ids, rendered.labels, strict=True) if label == IGNORE]
    )


def assert_labels_mirror_ids(rendered) -> None:
    assert len(rendered.labels) == len(rendered.input_ids)
    for token, label in zip(rendered.input_ids, rendered.labels, strict=True):
        assert label in (token, IGNORE)


# ----------------------------------------------------------------------------------------------------------
# The three shipped template styles


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("style", STYLES)
def test_exactly_each_reply_and_its_end_of_turn_is_trained(style, name):
    tokenizer = load_tokenizer(style)
    messages = CONVERSATIONS[name]
    rendered = render_conversation(tokenizer, messages)
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert trained_runs(tokenizer, rendered) == [reply + END_OF_TURN[style] for reply in replies]
    assert_labels_mirror_ids(rendered)
    assert not rendered.eos_appended and rendered.turns_unmasked == 0
    # Nothing of the system or user turns is trained: all of it is in the untrained tokens.
    prompt = untrained_text(tokenizer, rendered)
    for message in messages:
        if message["role"] != "assistant":
            assert message["content"] in prompt
    # Trained tokens sit exactly under the replies' characters in the rendered text.
    offsets = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)[
        "offset_mapping"
    ]
    trained_chars = "".join(
        rendered.text[lo:hi]
        for (lo, hi), label in zip(offsets, rendered.labels, strict=True)
        if label != IGNORE
    )
    assert trained_chars == "".join(reply + END_OF_TURN[style] for reply in replies)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("style", STYLES)
def test_ids_are_one_tokenization_of_the_full_rendering(style, name):
    tokenizer = load_tokenizer(style)
    messages = CONVERSATIONS[name]
    rendered = render_conversation(tokenizer, messages)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered.text == text
    assert rendered.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_the_default_template_is_chatml():
    plain = load_tokenizer()
    chatml = load_tokenizer("chatml")
    messages = CONVERSATIONS["system-two-turns"]
    assert render_conversation(plain, messages) == render_conversation(chatml, messages)


@pytest.mark.parametrize("style", STYLES)
def test_reply_text_with_inner_newlines_and_specials_is_trained_whole(style):
    tokenizer = load_tokenizer(style)
    reply = "Step 1: add.\n\nStep 2: done. 2 + 3 = 5"
    messages = [
        {"role": "user", "content": "Show your work for 2 + 3."},
        {"role": "assistant", "content": reply},
    ]
    rendered = render_conversation(tokenizer, messages)
    assert trained_runs(tokenizer, rendered) == [reply + END_OF_TURN[style]]


# ----------------------------------------------------------------------------------------------------------
# BOS


@pytest.mark.parametrize("style", ["llama3", "mistral"])
@pytest.mark.parametrize("adds_bos", [False, True], ids=["plain", "tokenizer-adds-bos"])
def test_exactly_one_bos_at_position_0(style, adds_bos):
    tokenizer = load_tokenizer(style, adds_bos=adds_bos)
    if adds_bos:  # the wrapper really adds a BOS on an ordinary encode
        assert tokenizer("Hi")["input_ids"][0] == tokenizer.bos_token_id
    messages = CONVERSATIONS["system-two-turns"]
    rendered = render_conversation(tokenizer, messages)
    assert rendered.text.startswith(BOS) and rendered.text.count(BOS) == 1
    bos = tokenizer.bos_token_id
    assert rendered.input_ids[0] == bos
    assert rendered.input_ids.count(bos) == 1
    assert rendered.labels[0] == IGNORE
    assert trained_runs(tokenizer, rendered) == [
        "The answer is 5." + END_OF_TURN[style],
        "It is 8." + END_OF_TURN[style],
    ]
    assert rendered.input_ids == tokenizer(rendered.text, add_special_tokens=False)["input_ids"]


def test_chatml_renders_no_bos_and_none_is_added():
    tokenizer = load_tokenizer("chatml")
    rendered = render_conversation(tokenizer, CONVERSATIONS["single"])
    assert tokenizer.bos_token_id not in rendered.input_ids


def test_a_tokenizer_that_adds_bos_gets_one_bos_with_a_template_that_renders_none():
    tokenizer = load_tokenizer("chatml", adds_bos=True)
    messages = CONVERSATIONS["system-two-turns"]
    rendered = render_conversation(tokenizer, messages)
    bos = tokenizer.bos_token_id
    assert rendered.input_ids[0] == bos and rendered.input_ids.count(bos) == 1
    assert rendered.labels[0] == IGNORE
    assert rendered.input_ids[1:] == tokenizer(rendered.text, add_special_tokens=False)["input_ids"]
    assert trained_runs(tokenizer, rendered) == ["The answer is 5.<|im_end|>", "It is 8.<|im_end|>"]


def test_a_template_that_renders_bos_twice_still_gives_one():
    tokenizer = load_tokenizer()
    tokenizer.chat_template = "{{ bos_token }}" + (TEMPLATES / "llama3.jinja").read_text(encoding="utf-8")
    rendered = render_conversation(tokenizer, CONVERSATIONS["single"])
    assert rendered.text.startswith(BOS + BOS)
    assert (
        rendered.input_ids.count(tokenizer.bos_token_id) == 1
        and rendered.input_ids[0] == tokenizer.bos_token_id
    )
    assert len(rendered.labels) == len(rendered.input_ids)
    assert trained_runs(tokenizer, rendered) == ["The answer is 5.<|eot_id|>"]


# ----------------------------------------------------------------------------------------------------------
# EOS


def test_plain_text_turn_ends_get_the_eos_appended_and_trained_on_the_final_turn():
    tokenizer = load_tokenizer()
    tokenizer.chat_template = PLAIN_TEMPLATE
    messages = CONVERSATIONS["system-two-turns"]
    rendered = render_conversation(tokenizer, messages)
    eos = tokenizer.eos_token_id
    assert rendered.eos_appended
    assert trained_runs(tokenizer, rendered) == ["The answer is 5.", "It is 8." + tokenizer.eos_token]
    assert rendered.input_ids.count(eos) == 1
    at = rendered.input_ids.index(eos)
    assert rendered.labels[at] == eos
    # The EOS goes right after the reply, and the template's own trailing text is kept (untrained) after it.
    assert tokenizer.decode(rendered.input_ids[:at]).endswith("It is 8.")
    assert all(label == IGNORE for label in rendered.labels[at + 1 :])
    without = tokenizer(rendered.text, add_special_tokens=False)["input_ids"]
    assert rendered.input_ids == [*without[:at], eos, *without[at:]]
    assert_labels_mirror_ids(rendered)


@pytest.mark.parametrize("style", STYLES)
def test_templates_with_an_end_of_turn_token_get_no_eos(style):
    tokenizer = load_tokenizer(style)
    rendered = render_conversation(tokenizer, CONVERSATIONS["system-two-turns"])
    assert not rendered.eos_appended
    assert tokenizer.eos_token_id not in rendered.input_ids


def test_no_eos_when_the_conversation_ends_with_a_user_turn():
    tokenizer = load_tokenizer()
    tokenizer.chat_template = PLAIN_TEMPLATE
    messages = [*CONVERSATIONS["single"], {"role": "user", "content": "Thanks!"}]
    rendered = render_conversation(tokenizer, messages)
    assert not rendered.eos_appended
    assert trained_runs(tokenizer, rendered) == ["The answer is 5."]


# ----------------------------------------------------------------------------------------------------------
# Templates that rewrite history, or refuse


def test_history_rewritten_by_the_template_is_left_untrained_and_counted():
    tokenizer = load_tokenizer()
    tokenizer.chat_template = HIDING_TEMPLATE
    messages = CONVERSATIONS["three-turns"]
    rendered = render_conversation(tokenizer, messages)
    assert rendered.turns_unmasked == 2
    assert trained_runs(tokenizer, rendered) == ["Red: apples, roses and fire trucks!<|im_end|>"]
    assert "Blue." not in rendered.text and "Green" not in rendered.text
    assert not rendered.eos_appended
    assert rendered.input_ids == tokenizer(rendered.text, add_special_tokens=False)["input_ids"]
    # With a single assistant turn nothing is rewritten.
    single = render_conversation(tokenizer, CONVERSATIONS["single"])
    assert single.turns_unmasked == 0
    assert trained_runs(tokenizer, single) == ["The answer is 5.<|im_end|>"]


def test_a_template_that_raises_is_a_user_error():
    tokenizer = load_tokenizer("mistral")
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "user", "content": "Hello?"},
        {"role": "assistant", "content": "Yes."},
    ]
    with pytest.raises(UserError) as info:
        render_conversation(tokenizer, messages)
    assert "chat template" in str(info.value) and "alternate" in str(info.value)


# ----------------------------------------------------------------------------------------------------------
# Hand-checked


def test_hand_checked_chatml_labels():
    tokenizer = load_tokenizer("chatml")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    rendered = render_conversation(tokenizer, messages)
    assert rendered.text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    pieces = [tokenizer.decode([t]) for t in rendered.input_ids]
    # fmt: off
    assert pieces == [
        "<|im_start|>", "u", "s", "er", "\n", "Hi", "<|im_end|>", "\n",
        "<|im_start|>", "a", "ss", "ist", "an", "t", "\n", "Hello", "<|im_end|>", "\n",
    ]
    assert rendered.input_ids == [3, 95, 93, 278, 209, 723, 4, 209, 3, 75, 676, 596, 291, 94, 209, 861, 4, 209]
    # Only "Hello" and its <|im_end|> are trained; the newline after <|im_end|> is never generated.
    assert rendered.labels == [
        -100, -100, -100, -100, -100, -100, -100, -100,
        -100, -100, -100, -100, -100, -100, -100, 861, 4, -100,
    ]
    # fmt: on
    assert (rendered.eos_appended, rendered.turns_unmasked) == (False, 0)


def test_chatml_markers_spelled_out_in_a_base_vocabulary_still_end_in_a_trained_eos():
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from qalign.chat_template import CHATML_TEMPLATE, end_of_turn_ids

    raw = json.loads((TOKENIZER / "tokenizer.json").read_text(encoding="utf-8"))
    raw["added_tokens"] = [
        t for t in raw["added_tokens"] if t["content"] not in ("<|im_start|>", "<|im_end|>")
    ]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(raw)), eos_token=EOS)
    tokenizer.chat_template = CHATML_TEMPLATE
    rendered = render_conversation(tokenizer, CONVERSATIONS["single"])
    # "<|im_end|>" is plain text here, nothing generation could stop on: the EOS after it is.
    assert rendered.eos_appended
    assert trained_runs(tokenizer, rendered) == ["The answer is 5.<|im_end|>" + EOS]
    assert end_of_turn_ids(tokenizer) == []
