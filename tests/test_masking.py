"""Which tokens are trained, for three template styles, derived from the template's own rendering."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TEMPLATES, TOKENIZER

from qalign.chat_template import IGNORE, end_of_turn_id, render_conversation
from qalign.errors import UserError

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "The answer is 5."},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "content": "It is 8."},
]
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": "</s>"}


@pytest.fixture
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


def with_template(tokenizer, name: str):
    tokenizer.chat_template = (TEMPLATES / f"{name}.jinja").read_text()
    return tokenizer


def trained_runs(tokenizer, rendered) -> list[str]:
    """Decoded maximal runs of trained tokens."""
    runs, current = [], []
    for token, label in zip(rendered.input_ids, rendered.labels, strict=True):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


@pytest.mark.parametrize("style", ["chatml", "llama3", "mistral"])
def test_every_assistant_turn_and_its_end_token_is_trained_and_nothing_else(tokenizer, style):
    tokenizer = with_template(tokenizer, style)
    rendered = render_conversation(tokenizer, CONVERSATION)
    end = END_OF_TURN[style]
    assert trained_runs(tokenizer, rendered) == [f"The answer is 5.{end}", f"It is 8.{end}"]
    assert not rendered.eos_appended and rendered.turns_unmasked == 0
    # One tokenization of the whole text: the ids are exactly what the model sees at inference.
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert rendered.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert end_of_turn_id(tokenizer) == tokenizer.convert_tokens_to_ids(end)


@pytest.mark.parametrize("style", ["llama3", "mistral"])
def test_templates_that_print_bos_get_exactly_one(tokenizer, style):
    tokenizer = with_template(tokenizer, style)
    ids = render_conversation(tokenizer, CONVERSATION).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


def test_a_tokenizer_that_adds_bos_itself_still_gives_one_bos(tokenizer):
    from tokenizers.processors import TemplateProcessing

    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.bos_token_id)]
    )
    assert tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id  # it really adds one now
    for style in ("llama3", "chatml"):  # one template prints BOS, the other does not
        ids = render_conversation(with_template(tokenizer, style), CONVERSATION).input_ids
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1, style


def test_hand_checked_labels_for_a_short_chatml_exchange(tokenizer):
    tokenizer = with_template(tokenizer, "chatml")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    rendered = render_conversation(tokenizer, messages)
    prompt = tokenizer("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)[
        "input_ids"
    ]
    reply = tokenizer("Yo", add_special_tokens=False)["input_ids"]
    im_end, newline = (
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
        tokenizer("\n", add_special_tokens=False)["input_ids"],
    )
    assert rendered.input_ids == prompt + reply + [im_end] + newline
    # Prompt untrained; the reply and <|im_end|> trained; the newline after it is never generated, so not trained.
    assert rendered.labels == [IGNORE] * len(prompt) + reply + [im_end] + [IGNORE] * len(newline)


def test_plain_text_turn_endings_get_eos_appended(tokenizer):
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
    tokenizer.chat_template += "{% if add_generation_prompt %}assistant: {% endif %}"
    rendered = render_conversation(tokenizer, CONVERSATION[1:3])
    assert rendered.eos_appended
    # EOS goes right after the reply's last token (the template's trailing blank line stays untrained).
    at = rendered.input_ids.index(tokenizer.eos_token_id)
    assert rendered.labels[at] == tokenizer.eos_token_id and rendered.labels[at - 1] != IGNORE
    assert all(label == IGNORE for label in rendered.labels[at + 1 :])
    # The prompt ends in "assistant: " and is tokenized on its own, as `qalign chat` sends it: the reply
    # starts at "The", and the space stays in the (untrained) prompt.
    assert trained_runs(tokenizer, rendered) == ["The answer is 5.<|endoftext|>"]
    assert end_of_turn_id(tokenizer) is None


def test_history_rewriting_templates_train_only_the_stable_turns(tokenizer):
    # Like reasoning templates that drop earlier assistant content: only the final turn renders as trained on.
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}A: ...\n"
        "{% else %}{{ m['role'][0] | upper }}: {{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}A: {% endif %}"
    )
    rendered = render_conversation(tokenizer, CONVERSATION)
    assert rendered.turns_unmasked == 1
    # "A: " ends the prompt, which is tokenized on its own (as at inference): no token straddles the prompt
    # and the reply, so the space is prompt and the reply starts at "It".
    assert trained_runs(tokenizer, rendered) == ["It is 8.<|im_end|>"]


def test_a_template_that_refuses_the_conversation_is_a_user_error(tokenizer):
    tokenizer = with_template(tokenizer, "mistral")
    with pytest.raises(UserError, match="chat template"):
        render_conversation(tokenizer, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_a_base_without_a_template_gets_chatml_and_a_warning(tmp_path):
    from transformers import AutoTokenizer

    from qalign.model import load_tokenizer
    from qalign.recipe import ModelSpec

    bare = AutoTokenizer.from_pretrained(TOKENIZER)
    bare.chat_template = None
    bare.save_pretrained(tmp_path)
    for name in ("chat_template.jinja",):
        (Path(tmp_path) / name).unlink(missing_ok=True)
    warnings: list[str] = []
    loaded = load_tokenizer(ModelSpec(base=str(tmp_path)), warnings.append)
    assert warnings and "ChatML" in warnings[0]
    text = loaded.apply_chat_template(CONVERSATION[1:3], tokenize=False)
    assert text.startswith("<|im_start|>user\n")
