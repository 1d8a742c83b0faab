"""Direct Preference Optimization: examples are (prompt, chosen, rejected) rendered through the chat template;
the loss compares the policy's log-probs of both responses with the frozen starting model's."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import PreTrainedTokenizerBase

from qalign.chat_template import IGNORE, render_conversation
from qalign.conversation import parse_tools
from qalign.data import DataReport, Row, check_turns, pad, parse_messages, to_messages
from qalign.errors import UserError
from qalign.logprobs import base_model, gathered_logprobs, label_logprobs, unwrap
from qalign.losses import chosen_nll, dpo_loss
from qalign.packing import check_model, forward_kwargs
from qalign.recipe import DpoSpec
from qalign.template_text import ignores_tools
from qalign.train import Stage


@dataclass
class DpoExample:
    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]
    where: str
    prompt_ids: list[int]
    reference: tuple[float, float, int, int] | None = None
    """Reference (chosen, rejected) summed log-probs and response lengths, when precomputed."""
    noun: ClassVar[str] = "pair"
    """What one example is called in progress lines and messages."""

    @property
    def input_ids(self) -> list[int]:  # what `validate` shows: the chosen side
        return self.chosen_ids

    @property
    def labels(self) -> list[int]:
        return self.chosen_labels


def split_preference(row: Row) -> tuple[list[dict], dict, dict]:
    """(prompt messages, chosen reply, rejected reply) from any preference layout: a prompt (string or
    messages) with chosen and rejected replies (strings, or TRL's explicit layout: lists of messages), or two
    whole conversations whose shared turns are the prompt."""
    data, where = row.data, row.where
    for key in ("chosen", "rejected"):
        if data.get(key) is None:
            raise UserError(f"{where}: missing field '{key}'")
    chosen, rejected = data["chosen"], data["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        prompt_messages = _prompt(data, where)
        replies = [{"role": "assistant", "content": chosen}, {"role": "assistant", "content": rejected}]
    elif isinstance(chosen, list) and isinstance(rejected, list) and _is_completion(chosen, rejected):
        # TRL's explicit layout: the prompt apart, each side only the reply.
        prompt_messages = _prompt(data, where)
        replies = [_one_reply(chosen, "chosen", where), _one_reply(rejected, "rejected", where)]
    elif isinstance(chosen, list) and isinstance(rejected, list):
        # UltraFeedback-binarized style: two whole conversations; the turns they share are the prompt.
        chosen_msgs = parse_messages(chosen, where, "chosen")
        rejected_msgs = parse_messages(rejected, where, "rejected")
        check_turns(chosen_msgs, where)
        check_turns(rejected_msgs, where)
        shared = 0
        while (
            shared < min(len(chosen_msgs), len(rejected_msgs))
            and chosen_msgs[shared] == rejected_msgs[shared]
        ):
            shared += 1
        if chosen_msgs == rejected_msgs:
            raise UserError(f"{where}: chosen and rejected are the same: nothing to prefer")
        prompt_messages = chosen_msgs[: min(shared, len(chosen_msgs) - 1, len(rejected_msgs) - 1)]
        tails = (chosen_msgs[len(prompt_messages) :], rejected_msgs[len(prompt_messages) :])
        if any(len(tail) != 1 or tail[0]["role"] != "assistant" for tail in tails):
            raise UserError(
                f"{where}: chosen and rejected must be the same conversation up to one final assistant turn"
            )
        replies = [tails[0][0], tails[1][0]]
    else:
        raise UserError(
            f"{where}: 'chosen' and 'rejected' must both be strings (with a 'prompt') or both lists of messages"
        )
    for reply, key in zip(replies, ("chosen", "rejected"), strict=True):
        if not (reply.get("content") or "").strip() and not reply.get("tool_calls"):
            raise UserError(f"{where}: '{key}' is empty")
    if replies[0] == replies[1]:
        raise UserError(f"{where}: chosen and rejected are the same: nothing to prefer")
    check_turns([*prompt_messages, replies[0]], where)
    return prompt_messages, replies[0], replies[1]


def _prompt(data: dict, where: str) -> list[dict]:
    prompt = data.get("prompt")
    if isinstance(prompt, list):
        return to_messages(Row(where, {"messages": prompt}), "messages", require_reply=False)
    if isinstance(prompt, str) and prompt.strip():
        return [{"role": "user", "content": prompt}]
    raise UserError(f"{where}: 'prompt' must be a non-empty string or a list of messages")


def _is_completion(chosen: list, rejected: list) -> bool:
    """Both sides start with an assistant turn: replies to a separate prompt, not whole conversations."""
    return all(
        bool(side) and isinstance(side[0], dict) and side[0].get("role") == "assistant"
        for side in (chosen, rejected)
    )


def _one_reply(side: list, key: str, where: str) -> dict:
    messages = parse_messages(side, where, key)
    if len(messages) != 1:
        # DPO scores one reply against another; a side of several turns (a later user turn, or a tool call,
        # its result and the answer) has no one reply to score.
        roles = ", ".join(m["role"] + (" with tool_calls" if m.get("tool_calls") else "") for m in messages)
        raise UserError(
            f"{where}: '{key}' must be one assistant turn (got {len(messages)} turns: {roles}); a preference "
            "pair compares one final reply per side: put earlier turns in 'prompt'"
        )
    return messages[0]


def prepare_dpo(
    rows: list[Row],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    overlong: str,
    source: str,
) -> tuple[list[DpoExample], DataReport]:
    report = DataReport(source=source, rows=len(rows), lengths=[])
    examples = []
    for row in rows:
        prompt, chosen, rejected = split_preference(row)
        tools = parse_tools(row.data.get("tools"), row.where)
        try:
            report.tools_ignored += ignores_tools(tokenizer, [*prompt, chosen], tools)
        except UserError as exc:
            raise UserError(f"{row.where}: {exc}") from None
        sides = []
        for reply in (chosen, rejected):
            try:
                rendered = render_conversation(tokenizer, [*prompt, reply], last_turn_only=True, tools=tools)
            except UserError as exc:
                raise UserError(f"{row.where}: {exc}") from None
            if all(label == IGNORE for label in rendered.labels[1:]):
                raise UserError(
                    f"{row.where}: no response token to train on after rendering the chat template"
                )
            report.eos_appended += rendered.eos_appended
            report.unanswered_opening += rendered.unanswered_opening
            report.inexact_prompts += rendered.inexact_prompt
            sides.append(rendered)
        longest = max(len(s.input_ids) for s in sides)
        if longest > max_length:
            if overlong == "drop":
                report.dropped_overlong += 1
                continue
            cut = [(s.input_ids[:max_length], s.labels[:max_length]) for s in sides]
            if any(all(label == IGNORE for label in labels[1:]) for _, labels in cut):
                report.dropped_overlong += 1
                continue
            report.truncated += 1
        else:
            cut = [(s.input_ids, s.labels) for s in sides]
        first_trained = next(i for i, label in enumerate(cut[0][1]) if label != IGNORE)
        example = DpoExample(*cut[0], *cut[1], row.where, cut[0][0][:first_trained])
        examples.append(example)
        report.lengths.append(max(len(example.chosen_ids), len(example.rejected_ids)))
        report.trained_tokens += sum(
            label != IGNORE for label in example.chosen_labels + example.rejected_labels
        )
    report.kept = len(examples)
    return examples, report


def shared_prefix(example: DpoExample) -> int:
    """Leading tokens chosen and rejected have in common and neither trains on: computed once for both."""
    shared = 0
    limit = min(len(example.chosen_ids), len(example.rejected_ids))
    while shared < limit and example.chosen_ids[shared] == example.rejected_ids[shared]:
        shared += 1
    for labels in (example.chosen_labels, example.rejected_labels):
        shared = min(shared, next((i for i, label in enumerate(labels) if label != IGNORE), len(labels)))
    return shared


def collate_dpo(examples: list[DpoExample], pad_id: int) -> dict[str, torch.Tensor]:
    """One row per pair: the shared prompt once, then the chosen response, then the rejected one, which attends
    to the prompt but not to the chosen response (see pair_attention). One forward pass serves both sides, and
    the prompt is computed once instead of twice.

    `segments` holds each row's (shared prefix, chosen length, rejected length); position ids restart after
    the prompt for the rejected response, so every token sees the positions it would in its own sequence."""
    ids, labels, positions, segments = [], [], [], []
    for e in examples:
        shared = shared_prefix(e)
        ids.append(e.chosen_ids + e.rejected_ids[shared:])
        # A row's first token has nothing before it to predict it from, on either side.
        rejected_labels = e.rejected_labels[shared:]
        if shared == 0:
            rejected_labels = [IGNORE, *rejected_labels[1:]]
        labels.append([IGNORE, *e.chosen_labels[1:], *rejected_labels])
        positions.append(list(range(len(e.chosen_ids))) + list(range(shared, len(e.rejected_ids))))
        segments.append([shared, len(e.chosen_ids), len(e.rejected_ids)])
    batch = {
        "input_ids": torch.tensor(pad(ids, pad_id)),
        "attention_mask": torch.tensor(pad([[1] * len(i) for i in ids], 0)),
        "labels": torch.tensor(pad(labels, IGNORE)),
        "position_ids": torch.tensor(pad(positions, 0)),
        "segments": torch.tensor(segments),
    }
    if all(e.reference is not None for e in examples):
        batch["reference"] = torch.tensor([e.reference for e in examples], dtype=torch.float64)
    return batch


def collate_dpo_packed(examples: list[DpoExample], pad_id: int) -> dict[str, torch.Tensor]:
    """collate_dpo's rows end to end in one row, no padding; `ends` says where each pair's stops. Each pair
    attends only within itself, through its own pair_attention mask (see packing.py)."""
    rows = [collate_dpo([e], pad_id) for e in examples]
    ids = torch.cat([r["input_ids"] for r in rows], dim=1)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.cat([r["labels"] for r in rows], dim=1),
        "position_ids": torch.cat([r["position_ids"] for r in rows], dim=1),
        "segments": torch.cat([r["segments"] for r in rows]),
        "ends": torch.tensor([r["input_ids"].shape[1] for r in rows]).cumsum(0),
    }
    if all("reference" in r for r in rows):
        batch["reference"] = torch.cat([r["reference"] for r in rows])
    return batch


def _packed_logprobs(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each trained token of collate_dpo_packed's row, its side: pair p's chosen p, rejected P + p)."""
    segments, ends = batch["segments"], batch["ends"]
    pairs = segments.shape[0]
    lengths = segments[:, 1] + segments[:, 2] - segments[:, 0]
    starts = ends - lengths
    labels = batch["labels"][0]
    column = (labels != IGNORE).nonzero().squeeze(1)
    pair = torch.searchsorted(ends, column, right=True)
    local, chosen_end = column - starts[pair], segments[pair, 1]
    # As in sequence_logprobs, within each pair's stretch of the row.
    source = starts[pair] + torch.where(local == chosen_end, segments[pair, 0], local) - 1
    dtype = base_model(model).get_input_embeddings().weight.dtype
    masks = [pair_attention(segments[p : p + 1], int(n), dtype) for p, n in enumerate(lengths.tolist())]
    logps = gathered_logprobs(
        model,
        batch["input_ids"],
        None,
        batch["position_ids"],
        source,
        labels[column],
        forward_kwargs(ends.tolist(), masks),
    )
    return logps, torch.where(local < chosen_end, pair, pair + pairs)


def pair_attention(segments: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, L, L] additive mask for collate_dpo's rows: causal, except that rejected tokens do not see the
    chosen response. Padding is never a key (a padding query sees itself, so no softmax row is empty)."""
    index = torch.arange(length, device=segments.device)
    query, key = index.view(1, -1, 1), index.view(1, 1, -1)
    shared, chosen_end = segments[:, 0].view(-1, 1, 1), segments[:, 1].view(-1, 1, 1)
    end = (segments[:, 1] + segments[:, 2] - segments[:, 0]).view(-1, 1, 1)
    chosen_key = (key >= shared) & (key < chosen_end)
    allowed = (key <= query) & ~((query >= chosen_end) & chosen_key) & ((key < end) | (key == query))
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)


def takes_pair_rows(config: object, length: int) -> bool:
    """Whether the model can run collate_dpo's rows of `length` tokens."""
    return attention_takes_pair_rows(
        getattr(config, "_attn_implementation", None), getattr(config, "sliding_window", None), length
    )


def attention_takes_pair_rows(attention: str | None, sliding_window: int | None, length: int) -> bool:
    """collate_dpo's rows need an attention that honours a custom mask over the whole row: sdpa or eager (not
    flash-attention), and no sliding window shorter than the row. Also what the memory planner assumes."""
    return attention in ("sdpa", "eager") and (sliding_window is None or sliding_window >= length)


def split_pair_rows(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """collate_dpo's rows as separate chosen and rejected rows (chosen rows first), for models that cannot take
    pair_attention."""
    ids, labels = [], []
    for row_ids, row_labels, (shared, chosen, rejected) in zip(
        batch["input_ids"].tolist(), batch["labels"].tolist(), batch["segments"].tolist(), strict=True
    ):
        end = chosen + rejected - shared
        ids.append((row_ids[:chosen], row_ids[:shared] + row_ids[chosen:end]))
        labels.append((row_labels[:chosen], [IGNORE] * shared + row_labels[chosen:end]))
    rows = [side[0] for side in ids] + [side[1] for side in ids]
    device = batch["input_ids"].device
    return {
        "input_ids": torch.tensor(pad(rows, 0), device=device),
        "attention_mask": torch.tensor(pad([[1] * len(r) for r in rows], 0), device=device),
        "labels": torch.tensor(pad([s[0] for s in labels] + [s[1] for s in labels], IGNORE), device=device),
    }


def sequence_logprobs(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs of each response [2B]: chosen then rejected, response lengths [2B])."""
    pairs, length = batch["segments"].shape[0], batch["input_ids"].shape[1]
    base = base_model(model)
    if "ends" in batch:
        logps, rows = _packed_logprobs(model, batch)
    elif takes_pair_rows(base.config, length):
        labels, segments = batch["labels"], batch["segments"]
        keep = labels != IGNORE
        row, column = keep.nonzero(as_tuple=True)
        chosen_end = segments[row, 1]
        # Each token is predicted by the one before it, except the first rejected token after the prompt.
        source = torch.where(column == chosen_end, segments[row, 0], column) - 1
        rows = torch.where(column < chosen_end, row, row + pairs)
        dtype = base.get_input_embeddings().weight.dtype
        logps = gathered_logprobs(
            model,
            batch["input_ids"],
            pair_attention(segments, length, dtype),
            batch["position_ids"],
            row * length + source,
            labels[keep],
        )
    else:
        split = split_pair_rows(batch)
        logps, rows = label_logprobs(model, split["input_ids"], split["attention_mask"], split["labels"])
    sums = torch.zeros(2 * pairs, dtype=logps.dtype, device=logps.device).index_add(0, rows, logps)
    counts = torch.zeros(2 * pairs, dtype=torch.long, device=logps.device).index_add(
        0, rows, torch.ones_like(rows)
    )
    return sums, counts


@contextmanager
def reference_mode(model: torch.nn.Module, reference_adapter: str | None) -> Iterator[None]:
    """The frozen starting model: the base with its adapter disabled, or a frozen copy of the initial adapter."""
    if reference_adapter is None:
        with model.disable_adapter():
            yield
        return
    model.set_adapter(reference_adapter)
    try:
        yield
    finally:
        model.set_adapter("default")


def reference_logprobs(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], reference_adapter: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad(), reference_mode(unwrap(model), reference_adapter):
        return sequence_logprobs(model, batch)


def make_dpo_step(spec: DpoSpec, reference_adapter: str | None):
    """The stage's step loss: this micro-batch's share of the step's mean loss and metrics."""

    def step(model: torch.nn.Module, batch: dict[str, torch.Tensor], norm: int) -> tuple[torch.Tensor, dict]:
        half = batch["segments"].shape[0]
        if "reference" in batch:
            cached = batch["reference"]
            reference = torch.cat([cached[:, 0], cached[:, 1]]).float()
        else:
            # Before the policy pass: switching adapters changes requires_grad flags, which must not happen
            # under a graph that is still to be backpropagated.
            reference, _ = reference_logprobs(model, batch, reference_adapter)
        policy, counts = sequence_logprobs(model, batch)
        nll = chosen_nll(policy[:half], counts[:half]) if spec.rpo_alpha else None
        if spec.loss == "ipo":
            # IPO is defined on length-normalised log-probs.
            policy, reference = policy / counts.clamp(min=1), reference / counts.clamp(min=1)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy[:half],
            policy[half:],
            reference[:half],
            reference[half:],
            spec.beta,
            spec.loss,
            spec.label_smoothing,
        )
        if nll is not None:
            losses = losses + spec.rpo_alpha * nll
        loss = losses.sum() / norm
        metrics = pair_metrics(loss, chosen_rewards, rejected_rewards, policy, norm)
        if nll is not None:
            metrics["nll/chosen"] = nll.detach().sum() / norm
        return loss, metrics

    return step


def pair_metrics(
    loss: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    logps: torch.Tensor,
    norm: int,
) -> dict[str, torch.Tensor]:
    """A pair objective's metric shares (each divided by the step's pairs): the rewards, their margin and
    accuracy, and the policy's log-probs of each side (`logps`: chosen then rejected)."""
    half = chosen_rewards.shape[0]
    return {
        "loss": loss.detach(),
        "rewards/chosen": chosen_rewards.sum() / norm,
        "rewards/rejected": rejected_rewards.sum() / norm,
        "rewards/margin": (chosen_rewards - rejected_rewards).sum() / norm,
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float().sum() / norm,
        "logps/chosen": logps[:half].detach().sum() / norm,
        "logps/rejected": logps[half:].detach().sum() / norm,
    }


def disable_dropout(model: torch.nn.Module) -> None:
    """DPO compares the policy with its own frozen start: with dropout on, the two differ at step 0 by noise,
    and the loss no longer starts at log 2."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def make_stage(context: object) -> Stage:
    """The DPO stage: the frozen start is the reference, precomputed once per dataset (cached beside the run) or
    computed live each step from a frozen copy of the starting adapter; the base is never loaded twice. The
    reference-free losses (simpo, orpo) have none of this, but keep dropout off like every other."""
    from qalign.adapter import adapter_digest
    from qalign.reference import attach_reference, cache_key
    from qalign.reference_free import describe_objective, make_reference_free_step
    from qalign.stage_data import examples_hash

    spec, model, start = context.spec, context.model, context.start
    context.progress.info(describe_objective(spec))
    reference_adapter = None
    if spec.reference == "live" and start is not None and not spec.reference_free:
        model.load_adapter(str(start), adapter_name="reference", is_trainable=False)
        reference_adapter = "reference"
    disable_dropout(model)
    pad_id = context.tokenizer.pad_token_id
    pairs = [*context.data.train, *(context.data.eval or [])]
    longest = max((len(e.chosen_ids) + len(e.rejected_ids) - shared_prefix(e) for e in pairs), default=0)
    check_model(model.config, "dpo", spec.packing is True, longest)

    def precompute() -> None:
        model_spec = context.recipe.model
        starting_point = {
            "base": model_spec.base,
            "revision": model_spec.revision,
            "quantization": model_spec.quantization,
            "double_quant": model_spec.double_quant,
            "dtype": str(context.dtype),
            "adapter": adapter_digest(start) if start is not None else None,
        }
        for label, examples in (("train", context.data.train), ("eval", context.data.eval)):
            if examples:
                key = cache_key(examples_hash(examples), starting_point)
                cache = context.paths.reference / f"{label}-{key}.safetensors"
                attach_reference(
                    model,
                    examples,
                    cache,
                    spec.batch_size,
                    pad_id,
                    context.device,
                    context.progress,
                    label,
                    context.world,
                )

    stage = Stage(
        name="dpo",
        spec=spec,
        train=context.data.train,
        eval=context.data.eval,
        collate=lambda examples: (collate_dpo_packed if spec.packing is True else collate_dpo)(
            examples, pad_id
        ),
        step_loss=make_reference_free_step(spec)
        if spec.reference_free
        else make_dpo_step(spec, reference_adapter),
        weight=lambda example: 1,
        show=("loss", "rewards/margin", "rewards/accuracy"),
        prepare=precompute if spec.reference == "precompute" and not spec.reference_free else None,
    )
    if spec.loss == "kto":
        from qalign.kto import as_kto

        return as_kto(stage, spec, pad_id, reference_adapter)
    return stage
