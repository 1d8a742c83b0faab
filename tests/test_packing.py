"""Packed micro-batches (packing.py): the examples end to end in one row, attention kept within each one. The
same examples make the same step as padded rows, so runs must agree to fp32 rounding."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import ARCHS, add_dpo, write_jsonl, write_recipe
from test_cli_sft import qalign

from qalign.chat_template import IGNORE
from qalign.dpo import DpoExample, collate_dpo, collate_dpo_packed
from qalign.packing import PACKED, forward_kwargs, packing_blocker
from qalign.sft import SftExample, collate_sft_packed


def test_packed_sft_row_restarts_positions_and_never_trains_a_first_token():
    a = SftExample([1, 2, 3], [IGNORE, 2, 3], "a")
    b = SftExample([4, 5], [4, 5], "b")  # a label on its first token: nothing of b's own precedes it
    batch = collate_sft_packed([a, b])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # Position 2 (a's last token) must not be trained to predict b's first token.
    assert batch["labels"].tolist() == [[IGNORE, 2, 3, IGNORE, 5]]
    assert batch["ends"].tolist() == [3, 5]
    # The trained targets are what each example's own padded row trains: a.weight + b.weight.
    assert int((batch["labels"][0, 1:] != IGNORE).sum()) == a.weight + b.weight == 3


def test_packed_dpo_row_is_the_padded_rows_end_to_end():
    pairs = [
        DpoExample([1, 2, 3, 4], [IGNORE, IGNORE, 3, 4], [1, 2, 5], [IGNORE, IGNORE, 5], "a", [1, 2]),
        DpoExample([6, 7], [IGNORE, 7], [6, 8, 9], [IGNORE, 8, 9], "b", [6]),
    ]
    padded, packed = collate_dpo(pairs, 0), collate_dpo_packed(pairs, 0)
    rows = [
        row[: int(n)].tolist()
        for row, n in zip(padded["input_ids"], padded["attention_mask"].sum(1), strict=True)
    ]
    assert packed["input_ids"].tolist() == [rows[0] + rows[1]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 2, 0, 1, 1, 2]]
    assert packed["ends"].tolist() == [5, 9]
    assert packed["segments"].tolist() == padded["segments"].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gpt2"])
def test_segmented_attention_equals_each_example_alone(arch):
    import transformers

    config_class, kwargs = ARCHS[arch]
    config = getattr(transformers, config_class)(**kwargs, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    decoder = transformers.AutoModelForCausalLM.from_config(config).eval().get_decoder()
    lengths = [5, 17, 1, 9]
    seqs = [torch.randint(3, 1000, (1, n)) for n in lengths]
    alone = torch.cat([decoder(input_ids=s).last_hidden_state for s in seqs], dim=1)
    ids = torch.cat(seqs, dim=1)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    ends = torch.tensor(lengths).cumsum(0).tolist()
    packed = decoder(input_ids=ids, position_ids=positions, **forward_kwargs(ends)).last_hidden_state
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    # Without the segments the restarted positions alone do not keep the examples apart (with this 4D mask
    # placeholder transformers builds no mask of its own): later examples then differ.
    crossed = decoder(
        input_ids=ids, position_ids=positions, attention_mask=torch.ones_like(ids)
    ).last_hidden_state
    assert not torch.allclose(crossed[:, lengths[0] :], alone[:, lengths[0] :], atol=1e-3)


def test_segments_attend_in_whole_blocks_on_a_cpu(monkeypatch):
    """torch's CPU flash attention keeps a kernel per length it meets, for the life of the process: a packed row
    of 12 examples of 12 lengths must reach it as at most ceil(200 / 64) = 4 lengths, and the attention of the
    real tokens must stay each example's own."""
    import transformers

    import qalign.packing as packing

    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, *args, **kwargs):
        seen.append(query.shape[2])
        return sdpa(query, *args, **kwargs)

    config_class, kwargs = ARCHS["llama"]
    config = getattr(transformers, config_class)(**kwargs, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    decoder = transformers.AutoModelForCausalLM.from_config(config).eval().get_decoder().to(torch.bfloat16)
    lengths = [1, 7, 30, 63, 64, 65, 90, 127, 128, 129, 150, 200]
    seqs = [torch.randint(3, 1000, (1, n)) for n in lengths]
    ids = torch.cat(seqs, dim=1)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    ends = torch.tensor(lengths).cumsum(0).tolist()
    monkeypatch.setattr(packing.F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        alone = torch.cat([decoder(input_ids=s).last_hidden_state for s in seqs], dim=1).float()
        seen.clear()
        packed = decoder(input_ids=ids, position_ids=positions, **forward_kwargs(ends)).last_hidden_state
    torch.testing.assert_close(packed.float(), alone, rtol=0.05, atol=0.05)
    # Each segment rounded up to whole blocks of 64: 64, 128, 192 and 256 tokens, in every layer.
    assert sorted(set(seen)) == [64, 128, 192, 256]
    assert len(seen) == len(lengths) * config.num_hidden_layers
    # fp32 attends at the examples' own lengths: its kernels are not kept per length, and its runs stay as
    # they were to the bit.
    seen.clear()
    with torch.no_grad():
        decoder.float()(input_ids=ids, position_ids=positions, **forward_kwargs(ends))
    assert sorted(set(seen)) == sorted(set(lengths))


def test_padded_rows_attend_in_whole_blocks_in_bf16_on_a_cpu(monkeypatch):
    """A padded micro-batch (70 tokens, one row shorter, so a mask) reaches bf16 attention as 128 tokens, with the
    real tokens' hidden states those of unblocked attention (to bf16 rounding); fp32 runs as it comes; and
    greedy generation (a blocked prefill, then decoding steps with a cache) picks the same tokens."""
    import transformers

    import qalign.packing as packing

    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, *args, **kwargs):
        seen.append((query.shape[2], query.dtype))
        return sdpa(query, *args, **kwargs)

    config_class, kwargs = ARCHS["llama"]
    config = getattr(transformers, config_class)(**kwargs, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, 1000, (2, 70))
    mask = torch.ones_like(ids)
    mask[1, 60:] = 0
    monkeypatch.setattr(
        transformers.integrations.sdpa_attention.torch.nn.functional, "scaled_dot_product_attention", spy
    )

    def hidden(dtype: torch.dtype, block: int) -> torch.Tensor:
        monkeypatch.setattr(packing, "SEGMENT_BLOCK", block)
        with torch.no_grad():
            return model.to(dtype).model(input_ids=ids, attention_mask=mask).last_hidden_state.float()

    blocked = hidden(torch.bfloat16, 64)
    assert {length for length, _ in seen} == {128}
    seen.clear()
    plain = hidden(torch.bfloat16, 1)
    assert {length for length, _ in seen} == {70}
    real = mask.bool()
    torch.testing.assert_close(blocked[real], plain[real], rtol=0.05, atol=0.05)
    seen.clear()
    hidden(torch.float32, 64)
    assert {length for length, _ in seen} == {70}

    def greedy(block: int) -> list[int]:
        monkeypatch.setattr(packing, "SEGMENT_BLOCK", block)
        model.to(torch.bfloat16)
        out = model.generate(ids[:1, :20], max_new_tokens=4, do_sample=False, pad_token_id=0)
        return out[0, 20:].tolist()

    seen.clear()
    assert greedy(64) == greedy(1)
    assert (64, torch.bfloat16) in seen and (1, torch.bfloat16) in seen  # the prefill blocked, decoding not


def test_a_pair_mask_is_padded_with_masked_keys():
    """A DPO pair's 3 x 3 additive mask at the 64-token length its attention runs at on a CPU: real queries keep
    their 3 x 3 block and see none of the 61 extra keys; the extra queries see every key (a finite softmax)."""
    low = torch.finfo(torch.bfloat16).min
    mask = torch.tensor([[0.0, low, low], [0.0, 0.0, low], [0.0, low, 0.0]], dtype=torch.bfloat16).view(
        1, 1, 3, 3
    )
    (_, _, padded), *_ = forward_kwargs([3], [mask])[PACKED]
    assert padded.shape == (1, 1, 64, 64)
    assert torch.equal(padded[..., :3, :3], mask)
    assert bool((padded[..., :3, 3:] == low).all())
    assert bool((padded[..., 3:, :] == 0).all())


def test_blockers():
    assert packing_blocker("sdpa", None, None, 300) == ""
    assert packing_blocker("sdpa", 4096, None, 300) == ""
    assert "sliding window" in packing_blocker("sdpa", 256, None, 300)
    assert "eager" in packing_blocker("eager", None, None, 300)
    assert "flash_attention_2" in packing_blocker("flash_attention_2", None, None, 300)
    assert "soft-capped" in packing_blocker("sdpa", None, 50.0, 300)


def _mixed_rows(n: int) -> list[dict]:
    """Conversations from 3 to about 60 words, so a padded micro-batch is mostly padding."""
    rows = []
    for i in range(n):
        question = " ".join(["add"] * (1 + (i * 7) % 23) + [str(i % 10), "and", str((i * 3) % 10)])
        answer = " ".join(["so"] * ((i * 5) % 31) + [f"it is {i % 10 + (i * 3) % 10}."])
        rows.append(
            {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
        )
    return rows


def _mixed_pairs(n: int) -> list[dict]:
    return [
        {
            "prompt": " ".join(["sum"] * (1 + (i * 5) % 19) + [str(i % 7)]),
            "chosen": " ".join(["yes"] * (1 + (i * 3) % 13)),
            "rejected": " ".join(["no"] * (1 + (i * 11) % 29)),
        }
        for i in range(n)
    ]


def _run(tmp_path, model, stage: str, packing: bool) -> tuple[list[dict], dict]:
    from safetensors.torch import load_file

    folder = tmp_path / f"{stage}-{packing}"
    recipe = write_recipe(
        folder,
        model,
        max_steps=3,
        save_every=0,
        eval_every=0,
        batch_size=4,
        grad_accum=2,
        gradient_checkpointing=packing,
        max_length=128,
        packing=packing,
    )
    write_jsonl(folder / "data" / "train.jsonl", _mixed_rows(24))
    data = yaml.safe_load(recipe.read_text())
    data["model"]["compute_dtype"] = "fp32"
    data["lora"]["dropout"] = 0.0  # dropout's masks follow the layout (see the README)
    if stage == "dpo":
        recipe.write_text(yaml.safe_dump(data, sort_keys=False))
        add_dpo(recipe, max_steps=2, eval_every=2, batch_size=4, grad_accum=2, packing=packing, max_length=96)
        write_jsonl(folder / "data" / "dpo.jsonl", _mixed_pairs(16))
        write_jsonl(folder / "data" / "dpo_eval.jsonl", _mixed_pairs(6))
        data = yaml.safe_load(recipe.read_text())
        del data["sft"]
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    result = qalign(stage, str(recipe), cwd=folder)
    assert result.returncode == 0, result.stderr
    run = folder / "runs" / "tiny" / stage
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if not r.get("final")], load_file(
        run / "adapter" / "adapter_model.safetensors"
    )


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_packed_run_equals_padded_run(tmp_path, tiny_model, stage):
    """Same examples, same step: the logged losses and the trained adapter agree to fp32 rounding (the packed
    run also with gradient checkpointing, whose recomputation must see the same segments)."""
    padded_records, padded = _run(tmp_path, tiny_model("llama"), stage, False)
    packed_records, packed = _run(tmp_path, tiny_model("llama"), stage, True)
    keys = ["loss", "eval_loss"] if stage == "sft" else ["loss", "rewards/margin", "eval_loss"]
    for a, b in zip(padded_records, packed_records, strict=True):
        for key in keys:
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    assert padded.keys() == packed.keys()
    moved = max(float((t - torch.zeros_like(t)).abs().max()) for n, t in padded.items() if "lora_B" in n)
    assert moved > 1e-3  # the adapter trained, so agreeing means something
    for name in padded:
        torch.testing.assert_close(packed[name], padded[name], rtol=1e-4, atol=1e-5)


def _arch_and_recipe(tmp_path, model, **sft):
    from qalign.model_shapes import describe, load_config
    from qalign.recipe_load import load_recipe

    recipe = load_recipe(write_recipe(tmp_path, model, **sft))
    config, source = load_config(recipe.model)
    return describe(config, recipe.model, source), recipe


def test_auto_packs_with_sdpa_and_a_batch_and_true_that_cannot_is_an_error(tmp_path, tiny_model):
    from dataclasses import replace

    from qalign.errors import UserError
    from qalign.memory import Lengths
    from qalign.memory_auto import resolve_auto

    lengths = Lengths(longest=60, rows=[(60, 30), (20, 10)])
    arch, recipe = _arch_and_recipe(tmp_path, tiny_model("llama"))
    assert resolve_auto(arch, recipe, "sft", lengths, "cpu", None)[0]["packing"] is True
    _, one = _arch_and_recipe(tmp_path / "one", tiny_model("llama"), batch_size=1)
    resolved, decided = resolve_auto(arch, one, "sft", lengths, "cpu", None)
    assert resolved["packing"] is False and "batch_size 1" in decided[-1]
    # A sliding window shorter than the longest example: the segments would not apply it.
    windowed = replace(arch, sliding_window=32)
    assert resolve_auto(windowed, recipe, "sft", lengths, "cpu", None)[0]["packing"] is False
    assert resolve_auto(windowed, recipe, "sft", Lengths(longest=30), "cpu", None)[0]["packing"] is True
    eager = recipe.model_copy(
        update={"model": recipe.model.model_copy(update={"attn_implementation": "eager"})}
    )
    resolved, decided = resolve_auto(arch, eager, "sft", lengths, "cpu", None)
    assert resolved["packing"] is False and "eager" in decided[-1]
    forced = eager.model_copy(update={"sft": eager.sft.model_copy(update={"packing": True})})
    with pytest.raises(UserError, match=r"sft\.packing: true, but attention eager"):
        resolve_auto(arch, forced, "sft", lengths, "cpu", None)


def test_gemma2_falls_back_to_padded_rows(tmp_path, tiny_model):
    from qalign.memory import Lengths
    from qalign.memory_auto import resolve_auto

    arch, recipe = _arch_and_recipe(tmp_path, tiny_model("gemma2"))
    resolved, decided = resolve_auto(arch, recipe, "sft", Lengths(longest=60), "cpu", None)
    assert resolved["packing"] is False, decided


def test_plan_counts_the_packed_row(tmp_path, tiny_model):
    from qalign.memory import Lengths, estimate

    arch, recipe = _arch_and_recipe(
        tmp_path, tiny_model("llama"), gradient_checkpointing=False, max_length=128
    )
    # One long example and three short ones: padded, 4 rows of 100 tokens; packed, one row of 100 + 3 * 10.
    lengths = Lengths(longest=100, longest_trained=50, rows=[(100, 50), (10, 5), (10, 5), (10, 5), (8, 4)])
    on = recipe.model_copy(update={"sft": recipe.sft.model_copy(update={"packing": True})})
    off = recipe.model_copy(update={"sft": recipe.sft.model_copy(update={"packing": False})})
    packed, padded = estimate(arch, on, "sft", lengths, "cpu"), estimate(arch, off, "sft", lengths, "cpu")
    assert (packed.rows, packed.seq_len, packed.trained_positions) == (1, 130, 65)
    assert (padded.rows, padded.seq_len) == (4, 100)
    assert packed.components["activations"] < padded.components["activations"] * 130 / 400 * 1.1


def test_validate_says_what_auto_packing_resolves_to(tmp_path, tiny_model):
    recipe = write_recipe(tmp_path, tiny_model("llama"))
    result = qalign("validate", str(recipe), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "sft.packing: auto -> true" in result.stdout
    result = qalign(
        "validate",
        str(recipe),
        "--set",
        "model.attn_implementation=eager",
        "--set",
        "sft.packing=true",
        cwd=tmp_path,
    )
    assert result.returncode == 2 and "sft.packing: true, but attention eager" in result.stderr


def test_a_model_whose_attention_never_sees_the_segments_stops(monkeypatch):
    """An architecture with an attention of its own (not transformers' interface) would silently attend across
    examples: the forward that ran no segmented attention is an error instead."""
    import transformers
    from transformers.modeling_utils import AttentionInterface

    from qalign import packing
    from qalign.errors import UserError
    from qalign.logprobs import label_logprobs

    config_class, kwargs = ARCHS["llama"]
    config = getattr(transformers, config_class)(**kwargs, pad_token_id=0)
    config._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(config)
    batch = collate_sft_packed([SftExample([5, 6, 7], [5, 6, 7], "a"), SftExample([8, 9], [8, 9], "b")])
    args = (model, batch["input_ids"], batch["attention_mask"], batch["labels"], batch["position_ids"])
    label_logprobs(*args, forward_kwargs(batch["ends"].tolist()))  # through the interface: fine
    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", packing._SDPA)
    with pytest.raises(UserError, match="set packing: false"):
        label_logprobs(*args, forward_kwargs(batch["ends"].tolist()))


def test_auto_leaves_dpo_pairs_padded_and_true_packs_them(tmp_path, tiny_model):
    """DPO's pair rows share their prompt and keep little padding: `make bench` measured packed pairs within the
    noise of padded ones for more memory, so `auto` keeps them padded; `dpo.packing: true` packs them, and
    KTO's rows (their own collate) are never packed."""
    from qalign.errors import UserError
    from qalign.memory import Lengths
    from qalign.memory_auto import resolve_auto
    from qalign.recipe_load import load_recipe

    arch, recipe = _arch_and_recipe(tmp_path, tiny_model("llama"))
    recipe = load_recipe(add_dpo(recipe.source))
    lengths = Lengths(longest=60, longest_pair=80, rows=[(60, 30), (20, 10)])
    resolved, decided = resolve_auto(arch, recipe, "dpo", lengths, "cpu", None)
    assert resolved["packing"] is False and "little padding" in decided[-1]
    packed = recipe.model_copy(update={"dpo": recipe.dpo.model_copy(update={"packing": True})})
    assert resolve_auto(arch, packed, "dpo", lengths, "cpu", None)[0].get("packing", True) is True
    kto = packed.model_copy(update={"dpo": packed.dpo.model_copy(update={"loss": "kto"})})
    with pytest.raises(UserError, match=r"dpo\.packing: true, but KTO's rows are not packed"):
        resolve_auto(arch, kto, "dpo", lengths, "cpu", None)


def test_the_plan_counts_what_padded_and_packed_attention_saves_beyond_its_tokens():
    """Attention run on extra positions keeps copies of query, key, value and output (2 bytes x (2 x 64 + 2 x
    64)) and a logsumexp per head (4 x 4): 28 extra positions are 28 x 528 = 14,784 bytes; an output projection
    whose input is not the tensor attention keeps adds its 100 tokens x 64 x 2 = 12,800. Blocks are 64 tokens
    on a CPU in bf16 only."""
    from qalign.memory import _attention_copies, _attention_length
    from qalign.model_shapes import Architecture

    arch = Architecture("llama", 1000, 64, 128, 2, 4, 4, 16, [], {}, 0, 0, {})
    assert _attention_copies(arch, 2, False, 100, 28) == 12_800 + 14_784
    assert _attention_length(100, "cpu", "bf16") == 128
    assert _attention_length(100, "cuda", "bf16") == _attention_length(100, "cpu", "fp32") == 100
