"""KTO (Ethayarajh et al. 2024) in the DPO stage: unpaired rows {prompt, completion, label}.

The loss needs each row's reward r = log pi(y|x) - log ref(y|x) and a reference point z0: the batch's mean of
the same log-ratio over mismatched pairs (x, y') of a prompt and another row's completion. Here each row's
mismatched completion is fixed ahead of time by dataset order (kl_partners), so a row is laid out like a DPO
pair: the prompt once, the row's completion (the "chosen" side), then the mismatched one (the "rejected" side,
attending to the prompt only). collate_dpo, sequence_logprobs and the cached reference (reference.py) then
serve KTO unchanged: one forward pass gives both, and the reference of both is precomputed like DPO's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from transformers import PreTrainedTokenizerBase

from qalign.chat_template import IGNORE, render_conversation
from qalign.conversation import parse_tools
from qalign.data import DataReport, Row, check_turns, parse_messages, to_messages
from qalign.dpo import DpoExample, collate_dpo, reference_logprobs, sequence_logprobs
from qalign.errors import UserError
from qalign.losses import kto_loss
from qalign.recipe import DpoSpec
from qalign.template_text import ignores_tools
from qalign.train import Stage

UNPAIRED_KEYS = ("prompt", "completion", "label")
# How far past the run of rows sharing its prompt a row looks for a completion unlike its own (a bound, so
# that a dataset with one completion repeated everywhere stays linear).
PARTNER_SEARCH = 64


@dataclass
class KtoExample(DpoExample):
    """A row as collate_dpo's pair: the chosen side is the row's completion (trained), the rejected side the
    mismatched completion of the KL estimate (another row's completion after this prompt; scored, not trained)."""

    desirable: bool = True
    noun: ClassVar[str] = "row"


@dataclass
class KtoReport(DataReport):
    desirable: int = 0
    undesirable: int = 0
    kl_truncated: int = 0
    """Mismatched completions cut to max_length (they only feed the KL estimate, so never drop a row)."""
    kl_matched: int = 0
    """Rows whose mismatched pair shares their prompt or completion: no unlike row near enough."""
    weights: tuple[float, float] | None = None
    """(desirable_weight, undesirable_weight) to check the balance against (the training set only)."""

    @property
    def label_counts(self) -> str:
        return f"{self.desirable} desirable and {self.undesirable} undesirable rows"

    def warnings(self, stage: str) -> list[str]:
        out = super().warnings(stage)
        if self.kl_truncated:
            out.append(
                f"{self.source}: {self.kl_truncated} mismatched completions of the KL estimate cut to "
                f"{stage}.max_length"
            )
        if self.kl_matched:
            out.append(
                f"{self.source}: {self.kl_matched} rows found no other row with a different prompt and completion "
                "to pair with for the KL estimate; their pair shares one of them"
            )
        if self.weights is not None and self.desirable and self.undesirable:
            w_d, w_u = self.weights
            ratio = w_d * self.desirable / (w_u * self.undesirable)
            if not 1 - 1e-9 <= ratio <= 4 / 3 + 1e-9:
                low = w_u * self.undesirable / self.desirable
                out.append(
                    f"{self.source}: desirable_weight * {self.desirable} desirable / (undesirable_weight * "
                    f"{self.undesirable} undesirable) is {ratio:.3g}; the KTO paper recommends 1 to 4/3: set "
                    f"{stage}.desirable_weight between {low:.3g} and {low * 4 / 3:.3g}"
                )
        return out


def is_unpaired(rows: list[Row], spec: DpoSpec, recipe_source: object) -> bool:
    """Whether the stage's rows are KTO's (format unpaired, or auto and the first row has completion and label);
    a loss that does not fit the data is an error."""
    # HH-RLHF texts are pairs, already split into conversations by stage_data.shape_rows.
    fmt = "preference" if spec.data.format == "hh_rlhf" else spec.data.format
    first = rows[0]
    if fmt == "auto":
        fmt = "unpaired" if {"completion", "label"} <= first.data.keys() else "preference"
        where = first.where
    else:
        where = f"{recipe_source}: dpo.data.format: {fmt}"
    if fmt == "unpaired" and spec.loss != "kto":
        raise UserError(
            f"{where}: prompt/completion/label rows are unpaired (KTO) data, which dpo.loss: {spec.loss} cannot "
            "take; set dpo.loss: kto"
        )
    if fmt == "preference" and spec.loss == "kto":
        raise UserError(
            f"{where}: dpo.loss: kto takes unpaired rows {{prompt, completion, label: true|false}}, "
            f"not preference pairs (the row has keys {sorted(first.data)}); write each pair as a desirable "
            "and an undesirable row, or use a pair loss such as sigmoid"
        )
    return fmt == "unpaired"


def parse_unpaired(row: Row) -> tuple[list[dict], dict, bool]:
    """(prompt messages, completion, label) of a row: the prompt a string or messages, the completion a string or
    one assistant message, the label true/false (also 1/0 and the strings "true"/"false", as CSV cells are)."""
    data, where = row.data, row.where
    for key in UNPAIRED_KEYS:
        if data.get(key) is None:
            raise UserError(f"{where}: missing field '{key}' (KTO rows are {{prompt, completion, label}})")
    prompt = data["prompt"]
    if isinstance(prompt, list):
        prompt_messages = to_messages(Row(where, {"messages": prompt}), "messages", require_reply=False)
    elif isinstance(prompt, str) and prompt.strip():
        prompt_messages = [{"role": "user", "content": prompt}]
    else:
        raise UserError(f"{where}: 'prompt' must be a non-empty string or a list of messages")
    completion = data["completion"]
    if isinstance(completion, str):
        reply = {"role": "assistant", "content": completion}
    elif isinstance(completion, list):
        messages = parse_messages(completion, where, "completion")
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise UserError(
                f"{where}: 'completion' must be one assistant turn (got {len(messages)} turns); earlier turns "
                "go in 'prompt'"
            )
        reply = messages[0]
    else:
        raise UserError(f"{where}: 'completion' must be a string or a list with one assistant message")
    if not (reply.get("content") or "").strip() and not reply.get("tool_calls"):
        raise UserError(f"{where}: 'completion' is empty")
    check_turns([*prompt_messages, reply], where)
    return prompt_messages, reply, _label(data["label"], where)


def _label(value: object, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise UserError(
        f"{where}: 'label' must be true (a desirable completion) or false (an undesirable one), got {value!r}"
    )


def kl_partners(prompts: list[str], completions: list[str]) -> tuple[list[int], int]:
    """For each row, the row whose completion makes its mismatched pair: the next in dataset order (wrapping
    around) with a different prompt and a different completion, past any run of rows sharing its prompt (as in
    data unpaired from preference pairs). Failing that, the next with a different completion, else the next row.
    Returns (partners, how many rows fell back)."""
    n = len(prompts)
    other_prompt, other_completion = _next_other(prompts), _next_other(completions)
    partners, fallbacks = [], 0
    for i in range(n):
        found = None
        for k in range(other_prompt[i], min(other_prompt[i] + PARTNER_SEARCH, i + n)):
            j = k % n
            if prompts[j] != prompts[i] and completions[j] != completions[i]:
                found = j
                break
        if found is None:
            fallbacks += 1
            found = other_completion[i] % n if other_completion[i] < i + n else (i + 1) % n
        partners.append(found)
    return partners, fallbacks


def _next_other(values: list[str]) -> list[int]:
    """For each index k of `values` read twice over, the first index after k whose value differs from k's
    (2 * len(values) when none does): past the run of equal values k starts."""
    n = len(values)
    out = [2 * n] * (2 * n)
    for k in range(2 * n - 2, -1, -1):
        out[k] = out[k + 1] if values[(k + 1) % n] == values[k % n] else k + 1
    return out


def prepare_kto(
    rows: list[Row],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    overlong: str,
    source: str,
    weights: tuple[float, float] | None = None,
) -> tuple[list[KtoExample], KtoReport]:
    """Rows rendered as KtoExamples. Overlong rows follow `overlong` like DPO pairs; a mismatched completion
    that is too long is cut (it only feeds the estimate). `weights` given: the balance is checked (train set)."""
    report = KtoReport(source=source, rows=len(rows), lengths=[], weights=weights)
    parsed = [(row, *parse_unpaired(row), parse_tools(row.data.get("tools"), row.where)) for row in rows]
    labels = {label for *_, label, _ in parsed}
    if len(labels) < 2:
        kind = "desirable (label true)" if True in labels else "undesirable (label false)"
        raise UserError(
            f"{source}: every row is {kind}; KTO needs both desirable and undesirable rows to learn from"
        )
    prompts = [json.dumps(prompt, sort_keys=True) for _, prompt, *_ in parsed]
    completions = [json.dumps(reply, sort_keys=True) for _, _, reply, *_ in parsed]
    partners, report.kl_matched = kl_partners(prompts, completions)
    examples = []
    for (row, prompt, reply, desirable, tools), partner in zip(parsed, partners, strict=True):
        try:
            report.tools_ignored += ignores_tools(tokenizer, [*prompt, reply], tools)
            own = render_conversation(tokenizer, [*prompt, reply], last_turn_only=True, tools=tools)
        except UserError as exc:
            raise UserError(f"{row.where}: {exc}") from None
        other = parsed[partner]
        try:
            mismatched = render_conversation(tokenizer, [*prompt, other[2]], last_turn_only=True, tools=tools)
        except UserError as exc:
            raise UserError(
                f"{row.where}: with {other[0].where}'s completion (the KL estimate's pair): {exc}"
            ) from None
        if _untrained(own.labels):
            raise UserError(f"{row.where}: no response token to train on after rendering the chat template")
        ids, labels_ = own.input_ids, own.labels
        if len(ids) > max_length:
            ids, labels_ = ids[:max_length], labels_[:max_length]
            if overlong == "drop" or _untrained(labels_):
                report.dropped_overlong += 1
                continue
            report.truncated += 1
        kl_ids, kl_labels = mismatched.input_ids, mismatched.labels
        if _untrained(kl_labels):
            raise UserError(
                f"{row.where}: with {other[0].where}'s completion (the KL estimate's pair): no response token "
                "to score after rendering the chat template"
            )
        if len(kl_ids) > max_length:
            kl_ids, kl_labels = kl_ids[:max_length], kl_labels[:max_length]
            if _untrained(kl_labels):  # the same prompt left the own side a token, so hardly ever
                report.dropped_overlong += 1
                continue
            report.kl_truncated += 1
        report.eos_appended += own.eos_appended
        report.unanswered_opening += own.unanswered_opening
        report.inexact_prompts += own.inexact_prompt
        first_trained = next(i for i, label in enumerate(labels_) if label != IGNORE)
        examples.append(
            KtoExample(ids, labels_, kl_ids, kl_labels, row.where, ids[:first_trained], desirable=desirable)
        )
        report.lengths.append(max(len(ids), len(kl_ids)))
        report.trained_tokens += sum(label != IGNORE for label in labels_)
    report.kept = len(examples)
    report.desirable = sum(e.desirable for e in examples)
    report.undesirable = report.kept - report.desirable
    if examples and not (report.desirable and report.undesirable):
        raise UserError(
            f"{source}: after dropping {report.dropped_overlong} rows longer than max_length, only "
            f"{'desirable' if report.desirable else 'undesirable'} rows are left; KTO needs both "
            "(raise max_length, or set overlong: truncate)"
        )
    return examples, report


def _untrained(labels: list[int]) -> bool:
    return all(label == IGNORE for label in labels[1:])


def collate_kto(examples: list[KtoExample], pad_id: int) -> dict[str, torch.Tensor]:
    """collate_dpo's rows (completion, then the mismatched completion), with each row's label."""
    batch = collate_dpo(examples, pad_id)
    batch["desirable"] = torch.tensor([e.desirable for e in examples], dtype=torch.bool)
    return batch


def make_kto_step(spec: DpoSpec, reference_adapter: str | None):
    """The stage's step loss: this micro-batch's share of the step's mean KTO loss, and its metric sums.

    z0 is estimated from the micro-batch's own mismatched pairs (the paper's per-batch estimate; with
    batch_size 1 a single pair, still unbiased), while the loss is divided by the rows of the whole optimizer
    step, so gradient accumulation sums to the step's mean as in DPO."""

    def step(model: torch.nn.Module, batch: dict[str, torch.Tensor], norm: int) -> tuple[torch.Tensor, dict]:
        rows = batch["input_ids"].shape[0]
        if "reference" in batch:
            cached = batch["reference"]
            reference = torch.cat([cached[:, 0], cached[:, 1]]).float()
        else:
            # Before the policy pass, as in DPO: switching adapters must not happen under a live graph.
            reference, _ = reference_logprobs(model, batch, reference_adapter)
        policy, _ = sequence_logprobs(model, batch)
        desirable = batch["desirable"]
        losses, rewards, kl = kto_loss(
            policy[:rows],
            reference[:rows],
            policy[rows:].detach(),  # the KL side only sets the reference point: no gradient, as in the paper
            reference[rows:],
            desirable,
            spec.beta,
            spec.desirable_weight,
            spec.undesirable_weight,
        )
        loss = losses.sum() / norm
        logps = policy[:rows].detach()
        metrics = {"loss": loss.detach(), "kl": kl * rows / norm}
        for name, mask in (("desirable", desirable), ("undesirable", ~desirable)):
            # Sums and counts: summarize_kto divides them over the whole step.
            metrics[f"_count/{name}"] = mask.sum()
            metrics[f"_rewards/{name}"] = rewards[mask].sum()
            metrics[f"_logps/{name}"] = logps[mask].sum()
        return loss, metrics

    return step


def summarize_kto(sums: dict[str, float]) -> dict[str, float]:
    """The step's metrics: rewards and log-probs are means over the desirable (or undesirable) rows of the step,
    absent when it has none; the margin is their difference, when it has both."""
    out = {key: value for key, value in sums.items() if not key.startswith("_")}
    for name in ("desirable", "undesirable"):
        count = sums.get(f"_count/{name}", 0.0)
        if count:
            out[f"rewards/{name}"] = sums[f"_rewards/{name}"] / count
            out[f"logps/{name}"] = sums[f"_logps/{name}"] / count
    if "rewards/desirable" in out and "rewards/undesirable" in out:
        out["rewards/margin"] = out["rewards/desirable"] - out["rewards/undesirable"]
    return out


def as_kto(stage: Stage, spec: DpoSpec, pad_id: int, reference_adapter: str | None) -> Stage:
    """The DPO stage (its data, reference and dropout set up alike) with KTO's collate, loss and metrics."""
    return replace(
        stage,
        collate=lambda examples: collate_kto(examples, pad_id),
        step_loss=make_kto_step(spec, reference_adapter),
        show=("loss", "kl", "rewards/margin"),
        summarize=summarize_kto,
    )
