"""Render a conversation through a chat template and decide which tokens are trained.

One function, `render_conversation`, returns the token ids and the labels (one source of truth). The whole
conversation is rendered once, as the model sees it; each assistant turn is then located in that text:

    start  where `render(turns before it, add_generation_prompt=True)` stops matching the whole text: what
           the model writes after the generation prompt starts there;
    end    after the text the template closes an assistant turn with (e.g. <|im_end|>, <|end|>, </s>), found
           by rendering a sentinel reply once as the last turn and once followed by a user turn.

So a template that renders earlier turns differently once later turns follow (Qwen3 drops their reasoning) is
trained on each turn as the conversation shows it, and text a template writes only at the very end (Phi's
<|endoftext|>) is never trained. The text is tokenized in pieces cut where each reply starts, so no token
straddles a prompt and its reply, and the prompt part tokenizes as `qalign chat` tokenizes its prompt.

Train as you infer, turn by turn: the tokens before every trained reply are checked against `prompt_ids` for
the turns before it. An earlier reply the whole conversation cannot prompt so (the template shows history
unlike its prompt, or a token of the history merges across the reply's start) is trained in a row of its own
where it is the final turn (`render_rows`), so every reply is trained once, after exactly chat's prompt.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from qalign.errors import UserError
from qalign.template_text import (
    REFUSALS,
    apply,
    check_tools_shown,
    closing_text,
    prefix_prompt,
    render_prompt_text,
    render_spelled,
)

IGNORE = -100

# For bases that ship no template. ChatML is what most open chat models use; on a base model whose vocabulary
# lacks <|im_start|>/<|im_end|> the markers are spelled out in ordinary tokens and an EOS is appended to the
# final turn, so the model still learns to stop.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass
class Rendered:
    input_ids: list[int]
    labels: list[int]
    """input_ids where trained, IGNORE elsewhere (aligned with input_ids; the shift happens in the loss)."""
    eos_appended: bool = False
    """The final assistant turn ended in no special token, so the tokenizer's EOS was added and trained."""
    turns_unmasked: int = 0
    """Assistant turns left untrained because the template does not show their content in the conversation."""
    text: str = ""
    """The row's text: the rendered conversation, or, where the template's generation prompt renders the
    conversation otherwise, that prompt followed by the final reply."""
    unanswered_opening: bool = False
    """The generation prompt opens something the final reply does not continue (DeepSeek-R1's prompt opens
    "<think>" and the reply has no reasoning), so the model learns to answer inside it."""
    turns: list[int] = field(default_factory=list)
    """The message index of each trained reply, in order."""
    apart: list[int] = field(default_factory=list)
    """Earlier assistant turns left untrained here because the tokens before them are not the tokens `qalign
    chat` prompts them with (the template shows the history otherwise, or a token merges across the start of
    the reply): each is trained in a row of its own, where it is the final turn (see `render_rows`)."""
    inexact_prompt: bool = False
    """The final trained reply's prompt is still not chat's prompt for its history (no published template
    does this; counted and reported so it is never silent)."""


@dataclass
class _Span:
    start: int
    end: int
    tail: str = ""
    """Generation-prompt text the conversation lacks before this turn (DeepSeek-R1's "<think>\\n")."""


def render(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    add_generation_prompt: bool = False,
    tools: list[dict] | None = None,
) -> str:
    """The template's text for these messages; a refusal becomes a UserError naming the turn (caller adds
    the row)."""
    if add_generation_prompt:
        return render_prompt_text(tokenizer, messages, tools)
    return render_spelled(tokenizer, messages, tools)[1]


def render_rows(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    trained_from: int = 0,
    tools: list[dict] | None = None,
) -> list[Rendered]:
    """The training rows for one conversation: the whole conversation, then one row for each earlier turn it
    cannot prompt exactly as `qalign chat` would (`Rendered.apart`), that turn being the final one there.
    Every assistant turn from `trained_from` on is trained once, after exactly chat's prompt tokens."""
    first = render_conversation(tokenizer, messages, trained_from=trained_from, tools=tools)
    rows = [first]
    for turn in first.apart:
        rows.append(render_conversation(tokenizer, messages[: turn + 1], last_turn_only=True, tools=tools))
    return rows


def render_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    last_turn_only: bool = False,
    trained_from: int = 0,
    tools: list[dict] | None = None,
) -> Rendered:
    """Token ids and labels for one conversation: every assistant turn from `trained_from` on is trained (only
    the final one with `last_turn_only`, as preference pairs need), nothing else.

    Train as you infer: the tokens before each trained reply are exactly `prompt_ids` for the turns before
    it, what `qalign chat` feeds the model at that point. An earlier reply that cannot be prompted so within
    the whole conversation (DeepSeek-R1 opens "<think>" only in a prompt; Mistral v0.3 shows the system turn
    and the tools in the last user turn only; a reply starting with "<" after Mistral's "[/INST]", or with a
    space after Phi's "<|assistant|>", tokenizes differently once the history is tokenized whole) is left
    untrained and listed in `apart`, for `render_rows` to train in a row of its own."""
    spelled, full = render_spelled(tokenizer, messages, tools)
    check_tools_shown(spelled, full)
    trained = [
        i
        for i, m in enumerate(spelled)
        if m["role"] == "assistant" and i >= trained_from and (not last_turn_only or i == len(spelled) - 1)
    ]
    closing = closing_text(tokenizer, spelled, trained[-1], tools) if trained else ""
    text, final, unanswered = full, None, False
    if trained and trained[-1] == len(spelled) - 1:
        text, final, unanswered = _prompted_final_turn(tokenizer, spelled, full, closing, tools)
    spans: list[_Span] = []
    turns: list[int] = []
    prompts: dict[int, str] = {}
    unmasked = 0
    floor = 0
    for i in trained if final is None else trained[:-1]:
        prompt = prompts[i] = prefix_prompt(tokenizer, spelled, i, tools)
        span = _locate(tokenizer, spelled, text, i, closing, floor, prompt, tools)
        if span is None or (final is not None and span.end > final.start):
            # The template does not show this turn's content (it hides or rewrites it): training on what it
            # shows instead would teach text no one wrote.
            unmasked += 1
            continue
        spans.append(span)
        turns.append(i)
        floor = span.end
    if final is not None:
        spans.append(final)
        turns.append(trained[-1])
        prompts[trained[-1]] = text[: final.start]

    chat = {turn: prompt_ids(tokenizer, spelled[:turn], tools) for turn in turns}
    ids, labels, spans, turns, apart, inexact = _prompted_as_chat(
        tokenizer, text, spans, turns, chat, prompts, len(spelled) - 1
    )
    eos_appended = False
    ends_conversation = (
        bool(spans) and spans[-1].end >= len(text.rstrip()) and trained[-1] == len(spelled) - 1
    )
    # A turn closed by plain text only (no closing, or ChatML markers spelled out in a base vocabulary) gives
    # generation nothing to stop on: the final turn gets the EOS.
    if ends_conversation and not _special_in(tokenizer, closing) and tokenizer.eos_token_id is not None:
        last = max(j for j, label in enumerate(labels) if label != IGNORE)
        ids.insert(last + 1, tokenizer.eos_token_id)
        labels.insert(last + 1, tokenizer.eos_token_id)
        eos_appended = True
    return Rendered(ids, labels, eos_appended, unmasked, text, unanswered, turns, sorted(apart), inexact)


def _prompted_as_chat(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    spans: list[_Span],
    turns: list[int],
    chat: dict[int, list[int]],
    prompts: dict[int, str],
    last: int,
) -> tuple[list, list, list[_Span], list[int], list[int], bool]:
    """(ids, labels, the spans and turns still trained, the turns moved apart, whether a prompt is still not
    chat's), with every trained reply's preceding tokens equal to `chat[turn]`.

    A reply whose prompt differs as text (the template shows the history otherwise) is moved apart. One whose
    prompt text agrees but whose tokens do not is broken by an earlier reply's cut: a token of the whole
    history merges across where that reply starts ("]<" after Mistral's "[/INST]", Phi's "<|assistant|>"
    swallowing the reply's space). That earlier reply is moved apart, so the history tokenizes whole, as chat
    tokenizes it. The turn `last` (the conversation's final message) cannot move: it is reported instead."""
    apart: list[int] = []

    def attempt(spans: list[_Span], turns: list[int]) -> tuple[list, list, list[int]]:
        ids, labels, starts = _tokenize(tokenizer, text, spans)
        ids, labels, shift = _one_bos(tokenizer, ids, labels)
        wrong = [
            k
            for k, (t, start) in enumerate(zip(turns, starts, strict=True))
            if ids[: start + shift] != chat[t]
        ]
        return ids, labels, wrong

    while True:
        ids, labels, wrong = attempt(spans, turns)
        if not wrong:
            return ids, labels, spans, turns, apart, False
        k = wrong[0]
        culprit = None
        if text.startswith(prompts[turns[k]]):
            for j in reversed(range(k)):
                trial = [*spans[:j], *spans[j + 1 :]], [*turns[:j], *turns[j + 1 :]]
                if k - 1 not in attempt(*trial)[2]:
                    culprit = j
                    break
        if culprit is None and turns[k] != last:
            culprit = k
        if culprit is None:
            return ids, labels, spans, turns, apart, True
        apart.append(turns[culprit])
        spans = [*spans[:culprit], *spans[culprit + 1 :]]
        turns = [*turns[:culprit], *turns[culprit + 1 :]]


def _prompted_final_turn(
    tokenizer: PreTrainedTokenizerBase,
    spelled: list[dict],
    full: str,
    closing: str,
    tools: list[dict] | None = None,
) -> tuple[str, _Span | None, bool]:
    """(the row's text, the final reply's span in it or None when the conversation's own text will do, whether
    the reply leaves what the prompt opens unanswered).

    The last turn is what a chat prompt is answered with, so its prompt must be exactly the generation prompt,
    even where the template renders the conversation otherwise: Mistral v0.3 shows the system turn only in
    the last user turn of a prompt, DeepSeek-R1's prompt opens "<think>" that no rendered turn has."""
    turn = len(spelled) - 1
    prompt = prefix_prompt(tokenizer, spelled, turn, tools)
    if full.startswith(prompt):
        return full, None, False
    span = _locate(tokenizer, spelled, full, turn, closing, 0, prompt, tools)
    if span is None:
        return full, None, False
    reply, continued = _reply_after_prompt(spelled[turn], full[span.start : span.end], span.tail, closing)
    final = _Span(len(prompt), len(prompt) + len(reply))
    return prompt + reply + full[span.end :], final, not continued


def _locate(
    tokenizer: PreTrainedTokenizerBase,
    spelled: list[dict],
    text: str,
    turn: int,
    closing: str,
    floor: int,
    prompt: str,
    tools: list[dict] | None = None,
) -> _Span | None:
    """Where assistant turn `turn` lies in `text`: from the end of its generation prompt to the end of the
    text that closes it. None when the text does not show the turn's content."""
    message = spelled[turn]
    tail = ""
    if text.startswith(prompt):
        start = len(prompt)
    else:
        start = _token_start(tokenizer, prompt, _common_prefix(prompt, text))
        if start >= len(_history(tokenizer, spelled, turn, tools)):
            tail = prompt[start:]  # only the generation prompt differs: it opens the reply (R1's "<think>")
        else:
            start = _anchor(spelled, text, turn, prompt, floor)
            if start < 0:
                return None
    if start < floor:
        return None
    content = message.get("content") or ""
    visible = content.split("</think>")[-1].strip()
    if closing:
        found = text.find(closing, start)
        end = found + len(closing)
    else:
        # Plain-text turn endings: the reply stops where its content does.
        found = text.find(visible, start) if visible else -1
        end = found + len(visible)
    if found < 0:
        return None
    shown = text[start:end]
    if visible and visible not in shown:
        return None
    following = (spelled[turn + 1].get("content") or "").strip() if turn + 1 < len(spelled) else ""
    if following and following in shown:
        return None  # no closing of its own: what was found closes a later turn
    calls = message.get("tool_calls") or []
    if not all(call["function"]["name"] in shown for call in calls):
        raise UserError(f"turn {turn} (assistant): this model's chat template does not show tool calls")
    return _Span(start, end, tail)


def _token_start(tokenizer: PreTrainedTokenizerBase, prompt: str, at: int) -> int:
    """`at`, moved back to the start of the prompt token it falls in: texts that differ after a shared "<"
    (R1's "<think>" against "<｜tool▁calls▁begin｜>") part at a token, not inside one."""
    offsets = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return max((lo for lo, hi in offsets if lo <= at and hi > lo), default=0) if at < len(prompt) else at


def _history(
    tokenizer: PreTrainedTokenizerBase, spelled: list[dict], turn: int, tools: list[dict] | None = None
) -> str:
    try:
        return apply(tokenizer, spelled[:turn], tools=tools) if turn else ""
    except REFUSALS:
        return ""


def _anchor(spelled: list[dict], text: str, turn: int, prompt: str, floor: int) -> int:
    """Where the turn starts when the generation prompt shows earlier turns differently from `text`: right
    after the turn before it (its content and what the prompt puts after that content)."""
    before = (spelled[turn - 1].get("content") or "").strip() if turn else ""
    if not before or before not in prompt:
        return -1
    after = prompt[prompt.rfind(before) + len(before) :]
    found = text.find(before + after, floor)
    return found + len(before + after) if found >= 0 else -1


def _reply_after_prompt(message: dict, shown: str, tail: str, closing: str) -> tuple[str, bool]:
    """(the text the model writes after the generation prompt for the final turn, whether it continues what
    that prompt opens). Where the prompt ends in text the conversation lacks (DeepSeek-R1 opens "<think>\\n"
    there, and drops reasoning from every turn it renders), the reply is what follows that text in the data:
    the reasoning too, when the content has it; otherwise the turn as the conversation shows it."""
    if not tail:
        return shown, True
    content = message.get("content") or ""
    if content.startswith(tail):
        body = content[len(tail) :]
    elif tail.strip() and content.lstrip().startswith(tail.strip()):
        body = content.lstrip()[len(tail.strip()) :].lstrip("\n")
    else:
        return shown, False
    return (body + shown[len(shown) - len(closing) :], True) if closing else (shown, False)


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _tokenize(
    tokenizer: PreTrainedTokenizerBase, text: str, spans: list[_Span]
) -> tuple[list, list, list[int]]:
    """Ids, labels and where each reply's tokens start, with the text cut where each reply starts: the prompt
    before it tokenizes on its own, as at inference, and no token straddles a prompt and its reply. A reply's
    piece runs on into the text after it (up to the next reply), so a closing token and what follows tokenize
    together, as they do at inference. A token is trained when it overlaps a reply."""
    cuts = [0, *(span.start for span in spans), len(text)]
    ids: list[int] = []
    labels: list[int] = []
    starts: list[int] = []
    for k, (lo, hi) in enumerate(itertools.pairwise(cuts)):
        if k:
            starts.append(len(ids))
        if hi <= lo:
            continue
        encoding = tokenizer(text[lo:hi], add_special_tokens=False, return_offsets_mapping=True)
        for token, (a, b) in zip(encoding["input_ids"], encoding["offset_mapping"], strict=True):
            trained = b > a and any(lo + a < span.end and lo + b > span.start for span in spans)
            ids.append(token)
            labels.append(token if trained else IGNORE)
    return ids, labels, starts


def _one_bos(tokenizer: PreTrainedTokenizerBase, ids: list[int], labels: list[int]) -> tuple[list, list, int]:
    """Exactly one BOS where the model expects one: templates that print it and tokenizers that add it
    would otherwise stack two, which quietly hurts training. Also returns how far the tokens moved."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return ids, labels, 0
    shift = 0
    while len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        ids, labels, shift = ids[1:], labels[1:], shift - 1
    if ids and ids[0] != bos and _tokenizer_adds_bos(tokenizer):
        ids, labels, shift = [bos, *ids], [IGNORE, *labels], shift + 1
    return ids, labels, shift


def _tokenizer_adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(with_special) and with_special[0] == tokenizer.bos_token_id


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], tools: list[dict] | None = None
) -> list[int]:
    """What `qalign chat` feeds the model for `messages`: the generation prompt, with BOS exactly as training
    rows have it, so a trained row's prompt part and a chat prompt are the same tokens."""
    ids = tokenizer(
        render(tokenizer, messages, add_generation_prompt=True, tools=tools), add_special_tokens=False
    )
    ids = list(ids["input_ids"])
    return _one_bos(tokenizer, ids, [IGNORE] * len(ids))[0]


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens the template closes an assistant turn with (e.g. <|im_end|>, <|eot_id|>, <|end|>),
    which generation must stop at; empty when the template ends turns with plain text."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    try:
        spelled, _ = render_spelled(tokenizer, probe)
    except Exception:  # a template that refuses even this exchange: there is nothing to stop on
        return []
    return _special_in(tokenizer, closing_text(tokenizer, spelled, 1))


def _special_in(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """The special tokens in `text`, in order."""
    if not text:
        return []
    special = set(tokenizer.all_special_ids)
    special |= {t for t, token in tokenizer.added_tokens_decoder.items() if token.special}
    return [t for t in tokenizer(text, add_special_tokens=False)["input_ids"] if t in special]


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The last special token that closes an assistant turn, or None when the template ends turns with
    plain text."""
    ids = end_of_turn_ids(tokenizer)
    return ids[-1] if ids else None


def describe_template(tokenizer: PreTrainedTokenizerBase) -> str:
    """One line on how trained tokens are found, for the start of a run and for `validate`."""
    template = tokenizer.chat_template or ""
    marked = re.search(r"{%-?\s*generation\s*-?%}", template) is not None
    ends = end_of_turn_ids(tokenizer)
    closing = (
        f"assistant turns end with {''.join(tokenizer.convert_ids_to_tokens(ends))!r}"
        if ends
        else "assistant turns end without a special token (EOS is appended to final turns)"
    )
    how = "has {% generation %} markers" if marked else "has no {% generation %} markers"
    return f"chat template {how}; trained tokens found in the rendered conversation; {closing}"
