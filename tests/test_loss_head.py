"""The loss head (qalign/logprobs.py): the chunked log-probs of trained tokens give the values and gradients of
the plain computation (full logits, log-softmax, gather), with every logit transform, a trainable or tied
head, SFT and every DPO loss, and keep no logits for the backward."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from qalign import dpo, logprobs
from qalign.chat_template import IGNORE
from qalign.dpo import DpoExample, collate_dpo, make_dpo_step
from qalign.logprobs import _model_logit_transform, chunk_tokens, label_logprobs, selective_logprobs
from qalign.model import attach_lora, load_base
from qalign.recipe import DpoSpec, LoraSpec, ModelSpec
from qalign.sft import sft_step


class Base(torch.nn.Module):
    """What selective_logprobs reads of a model: its output embeddings and its config."""

    def __init__(self, head: torch.nn.Module, **config: float) -> None:
        super().__init__()
        self.head, self.config = head, SimpleNamespace(**config)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head


def full_logits_logprobs(base: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The plain way: every logit at once, the model's transform, a log-softmax and a gather."""
    logits = _model_logit_transform(base.config, base.get_output_embeddings()(hidden).float())
    return torch.log_softmax(logits, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)


def test_hand_checked_values_and_gradients():
    # Logits (ln 2, 0, 0): softmax (1/2, 1/4, 1/4); the target is token 0, so log p = ln(1/2), the logits'
    # gradient is onehot - softmax = (1/2, -1/4, -1/4), the hidden state's is that times W = (1/2, -1/4) and
    # the weight's is its outer product with the hidden state.
    head = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    hidden = torch.tensor([[math.log(2), 0.0]], requires_grad=True)
    logp = selective_logprobs(Base(head), hidden, torch.tensor([0]))
    logp.sum().backward()
    assert logp.item() == pytest.approx(math.log(0.5), abs=1e-6)
    torch.testing.assert_close(hidden.grad, torch.tensor([[0.5, -0.25]]))
    ln2 = math.log(2)
    torch.testing.assert_close(head.weight.grad, torch.tensor([[ln2 / 2, 0], [-ln2 / 4, 0], [-ln2 / 4, 0]]))


TRANSFORMS = {
    "none": {},
    "cohere-scale": {"logit_scale": 0.25},
    "granite-scaling": {"logits_scaling": 8.0},
    "gemma-softcap": {"final_logit_softcapping": 2.0},
    "all-three": {"logit_scale": 3.0, "logits_scaling": 2.0, "final_logit_softcapping": 1.5},
}


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("trainable_head", [False, True], ids=["frozen-head", "trainable-head"])
def test_values_and_gradients_equal_the_full_logits_ones(monkeypatch, transform, trainable_head):
    # 5 tokens per chunk: 23 tokens make four whole chunks and a partial one.
    vocab, width, n = 50, 16, 23
    monkeypatch.setattr(logprobs, "LOGITS_CHUNK_BYTES", 4 * vocab * 5)
    assert chunk_tokens(vocab) == 5
    torch.manual_seed(0)
    head = torch.nn.Linear(width, vocab, bias=trainable_head).requires_grad_(trainable_head)
    base = Base(head, **TRANSFORMS[transform])
    hidden = (3 * torch.randn(n, width)).requires_grad_()
    targets = torch.randint(0, vocab, (n,))
    upstream = torch.randn(n)  # not uniform, as DPO's per-row weights are not

    results = []
    for compute in (selective_logprobs, full_logits_logprobs):
        hidden.grad = None
        head.zero_grad(set_to_none=True)
        logp = compute(base, hidden, targets)
        (logp * upstream).sum().backward()
        grads = [hidden.grad] + ([head.weight.grad, head.bias.grad] if trainable_head else [])
        results.append([logp.detach(), *grads])
    assert not trainable_head or head.weight.grad.abs().sum() > 0
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


def test_chunks_are_sized_by_bytes_of_logits():
    budget = logprobs.LOGITS_CHUNK_BYTES
    assert chunk_tokens(8192) * 8192 * 4 == budget  # 2048 tokens of an 8k vocabulary
    for vocab in (32_000, 131_072, 262_144):
        assert chunk_tokens(vocab) * vocab * 4 <= budget
        assert chunk_tokens(vocab) % 64 == 0
    assert chunk_tokens(131_072) == 128
    assert chunk_tokens(10**9) == 1  # never zero


def test_the_backward_keeps_no_logits():
    # Whatever autograd saves for the backward, across the whole computation, is at most token-by-hidden
    # sized: no [tokens x vocab] tensor stays behind.
    vocab, width, n = 4096, 8, 64
    head = torch.nn.Linear(width, vocab, bias=False).requires_grad_(False)
    hidden = torch.randn(n, width, requires_grad=True)
    saved = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp = selective_logprobs(Base(head, final_logit_softcapping=3.0), hidden * 1.0, torch.arange(n))
    assert saved and max(saved) <= n * width
    logp.sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


def test_no_grad_computes_no_gradient(monkeypatch):
    calls = []
    real = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    head = torch.nn.Linear(4, 10, bias=False).requires_grad_(False)
    hidden = torch.randn(6, 4, requires_grad=True)
    with torch.no_grad():
        logp = selective_logprobs(Base(head), hidden, torch.arange(6))
    assert not logp.requires_grad and calls == []
    torch.testing.assert_close(logp, full_logits_logprobs(Base(head), hidden, torch.arange(6)).detach())


# -- through the real models: 4-bit bases with LoRA, as training loads them ---------------------------------


def lora_model(folder, quantization: str = "nf4") -> torch.nn.Module:
    spec = ModelSpec(base=str(folder), compute_dtype="fp32", quantization=quantization)
    model = attach_lora(load_base(spec, torch.device("cpu")), LoraSpec(r=4, dropout=0.0), False)
    torch.manual_seed(3)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # a trained adapter, so the gradient reaches lora_A too
            torch.nn.init.normal_(param, std=0.3)
    return model


def grads_of(model: torch.nn.Module, loss_of) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_of()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def assert_same(a: tuple, b: tuple) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, atol=1e-5, rtol=1e-5)
    assert len(grads_a) == len(grads_b) and grads_a
    for got, expected in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def sft_batch() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[2, 5, 9, 14, 33, 7, 81, 3], [2, 6, 10, 44, 12, 3, 0, 0]])
    labels = ids.clone()
    labels[:, :3] = IGNORE
    labels[1, 6:] = IGNORE
    return {"input_ids": ids, "attention_mask": (labels != IGNORE) | (torch.arange(8) < 3), "labels": labels}


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # gemma2: softcapping and tied embeddings
def test_sft_matches_the_models_own_full_logits(tiny_model, arch):
    model = lora_model(tiny_model(arch))
    batch = sft_batch()
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    norm = int((batch["labels"][:, 1:] != IGNORE).sum())

    def ours() -> torch.Tensor:
        return sft_step(model, batch, norm)[0]

    def plain() -> torch.Tensor:
        # The model's own forward: logits everywhere, its own softcapping, then the masked NLL.
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        return (
            F.cross_entropy(
                logits[:, :-1].flatten(0, 1),
                batch["labels"][:, 1:].flatten(),
                ignore_index=IGNORE,
                reduction="sum",
            )
            / norm
        )

    assert_same(grads_of(model, ours), grads_of(model, plain))


def pairs() -> list[DpoExample]:
    def pair(prompt: list[int], chosen: list[int], rejected: list[int]) -> DpoExample:
        mask = [IGNORE] * len(prompt)
        return DpoExample(prompt + chosen, mask + chosen, prompt + rejected, mask + rejected, "x", prompt)

    return [pair([2, 5, 6, 7], [10, 11, 12], [13, 14]), pair([2, 8, 9], [20, 21], [20, 22, 23, 24])]


@pytest.mark.parametrize("layout", ["pair-rows", "split-rows"])
@pytest.mark.parametrize("loss", ["sigmoid", "hinge", "ipo"])
def test_every_dpo_loss_matches_full_logits(tiny_model, monkeypatch, layout, loss):
    model = lora_model(tiny_model("gemma2"))
    if layout == "split-rows":  # what flash-attention and short sliding windows get
        monkeypatch.setattr(dpo, "takes_pair_rows", lambda config, length: False)
    batch = collate_dpo(pairs(), 0)
    batch["reference"] = torch.tensor([[-30.0, -25.0, 3, 2], [-20.0, -41.0, 2, 4]], dtype=torch.float64)
    step = make_dpo_step(DpoSpec(data={"train": "x.jsonl"}, beta=0.5, loss=loss, label_smoothing=0.1), None)
    ours = grads_of(model, lambda: step(model, batch, 2)[0])
    monkeypatch.setattr(logprobs, "selective_logprobs", full_logits_logprobs)
    assert_same(ours, grads_of(model, lambda: step(model, batch, 2)[0]))


def test_trained_tied_embeddings_get_the_head_and_the_lookup_gradients(tiny_model, monkeypatch):
    # Unquantized gemma2, its embeddings (tied to the head) trained: the weight's gradient sums the head's part
    # (from the chunked backward) and the lookup's.
    model = lora_model(tiny_model("gemma2"), quantization="none")
    embeddings = model.get_base_model().get_input_embeddings().weight
    assert embeddings is model.get_base_model().get_output_embeddings().weight
    embeddings.requires_grad_(True)
    batch = sft_batch()

    def loss() -> torch.Tensor:
        logps, _ = label_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        return -(logps * torch.linspace(0.5, 2, logps.numel())).sum()

    ours = grads_of(model, loss)
    monkeypatch.setattr(logprobs, "selective_logprobs", full_logits_logprobs)
    plain = grads_of(model, loss)
    assert_same(ours, plain)
    assert ours[1][0].shape == embeddings.shape and ours[1][0].abs().sum() > 0
