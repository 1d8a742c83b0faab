"""`qalign export` of Gemma 2 and Gemma 3 (text and image-text checkpoints): Gemma's 1 + weight norms, soft-caps,
sliding-window layers and query scaling; read back with the gguf package's reader and, where llama-cpp-python is
installed, run by llama.cpp."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import test_gguf_architectures as architectures  # noqa: E402
from test_gguf import (  # noqa: E402
    _export,
    _fields,
    _hf_weights,
    _llama_cpp_logits,
    _tensors,
    _transformers_logits,
    _values,
    runner,
)

from qalign.cli import app  # noqa: E402

SPM_TEXTS = architectures.SPM_TEXTS
# The SentencePiece test model's fixture, registered here under its own name so these tests can ask for it.
sentencepiece_model = architectures.sentencepiece_model


def _assert_flips_are_ties(want: np.ndarray, got: np.ndarray) -> None:
    """q8_0 against the full-precision logits of a random Gemma, whose small logits put many positions on a
    near-tie: top-1 agreement may fall under 95%, but at most 10% of positions may flip, and each flip must be
    a tie within the largest rounding error."""
    top2 = np.sort(want, axis=-1)[:, -2:]
    flipped = got.argmax(-1) != want.argmax(-1)
    assert flipped.mean() <= 0.1
    assert np.all(top2[flipped, 1] - top2[flipped, 0] < np.abs(got - want).max())


def _with_random_norms(config: object, tokenizer: object, folder: Path) -> Path:
    """A seeded random model from `config`, its norm weights drawn too (so Gemma's 1 + weight shows), saved
    with `tokenizer` into `folder`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0, 0.3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _gemma2(sentencepiece_model, folder: Path, **shape: int) -> Path:
    """A tiny Gemma 2 of `shape` (hidden 64 over 4 heads of 16 and 2 layers unless it says otherwise), with
    random norm weights so that the (1 + weight) of Gemma's RMSNorm shows."""
    import transformers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sentencepiece_model)
    shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=16) | shape
    config = transformers.Gemma2Config(
        vocab_size=len(tokenizer),
        intermediate_size=128,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **shape,
    )
    return _with_random_norms(config, tokenizer, folder)


@pytest.fixture(scope="module")
def gemma2_model(sentencepiece_model, tmp_path_factory) -> Path:
    """Queries scaled as llama.cpp scales them (query_pre_attn_scalar = head_dim)."""
    return _gemma2(sentencepiece_model, tmp_path_factory.mktemp("gemma2") / "model", query_pre_attn_scalar=16)


def test_gemma2_norms_and_softcaps(gemma2_model, tmp_path):
    reader = _export(gemma2_model, tmp_path / "g.gguf", "f32")
    fields, tensors = _fields(reader), _tensors(reader)
    assert fields["general.architecture"] == "gemma2"
    assert fields["gemma2.attn_logit_softcapping"] == pytest.approx(50.0)
    assert fields["gemma2.final_logit_softcapping"] == pytest.approx(30.0)
    assert fields["gemma2.attention.sliding_window"] == 4096
    assert "output.weight" not in tensors
    hf = _hf_weights(gemma2_model)
    for name, hf_name in (
        ("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight"),
        ("blk.0.post_attention_norm.weight", "model.layers.0.post_attention_layernorm.weight"),
        ("blk.1.ffn_norm.weight", "model.layers.1.pre_feedforward_layernorm.weight"),
        ("blk.1.post_ffw_norm.weight", "model.layers.1.post_feedforward_layernorm.weight"),
        ("output_norm.weight", "model.norm.weight"),
    ):
        np.testing.assert_array_equal(_values(tensors[name]), hf[hf_name] + 1.0)


@pytest.fixture(scope="module")
def gemma2_other_scale(sentencepiece_model, tmp_path_factory) -> Path:
    """Queries scaled by 1/sqrt(64) (query_pre_attn_scalar), with 16-dim heads, which llama.cpp would scale by
    1/sqrt(16): the export folds sqrt(16 / 64) = 0.5 into the query projection."""
    return _gemma2(
        sentencepiece_model, tmp_path_factory.mktemp("gemma2-scale") / "model", query_pre_attn_scalar=64
    )


def test_gemma2_query_scale_is_folded_into_the_query_projection(gemma2_other_scale, tmp_path):
    tensors = _tensors(_export(gemma2_other_scale, tmp_path / "g.gguf", "f32"))
    hf = _hf_weights(gemma2_other_scale)
    np.testing.assert_allclose(
        _values(tensors["blk.1.attn_q.weight"]), hf["model.layers.1.self_attn.q_proj.weight"] * 0.5, rtol=1e-6
    )
    np.testing.assert_array_equal(
        _values(tensors["blk.1.attn_k.weight"]), hf["model.layers.1.self_attn.k_proj.weight"]
    )


def test_gemma2_other_query_scale_through_llama_cpp(gemma2_other_scale, tmp_path):
    pytest.importorskip("llama_cpp")
    want, got = architectures.spm_logits(gemma2_other_scale, tmp_path / "g.gguf", "f32")
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-3


def test_gemma2_27b_query_scale_through_llama_cpp(sentencepiece_model, tmp_path):
    """Gemma 2 27B's queries are scaled by 1/sqrt(hidden/heads) = 1/sqrt(144), not by its head_dim of 128;
    llama.cpp knows the 27B by its 46 layers and does the same, so nothing is folded. Here in miniature: 46
    layers, hidden 64 over 4 heads (16) against 8-dim heads."""
    pytest.importorskip("llama_cpp")
    model = _gemma2(
        sentencepiece_model, tmp_path / "model", num_hidden_layers=46, head_dim=8, query_pre_attn_scalar=16
    )
    tensors = _tensors(_export(model, tmp_path / "plain.gguf", "f32"))
    np.testing.assert_array_equal(
        _values(tensors["blk.0.attn_q.weight"]), _hf_weights(model)["model.layers.0.self_attn.q_proj.weight"]
    )
    want, got = architectures.spm_logits(model, tmp_path / "g.gguf", "f32")
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-3


@pytest.mark.parametrize("quant", ["f32", "q8_0"])
def test_gemma2_through_llama_cpp(gemma2_model, tmp_path, quant):
    pytest.importorskip("llama_cpp")
    want, got = architectures.spm_logits(gemma2_model, tmp_path / f"gemma2-{quant}.gguf", quant)
    if quant == "f32":
        assert np.abs(got - want).max() / np.abs(want).max() < 1e-3
    else:
        # Gemma's final soft-cap squeezes this random model's logits (median top-2 margin about 0.03): about 93%.
        _assert_flips_are_ties(want, got)


@pytest.fixture(scope="module")
def gemma3_model(sentencepiece_model, tmp_path_factory) -> Path:
    """A tiny Gemma 3 with llama.cpp's layer pattern (layers 0-4 and 6 within an 8-token sliding window, layer
    5 global), linear RoPE scaling on the global layer as the 4B and larger models have, a query scalar other
    than head_dim (so the query-norm fold shows) and random norm weights (so Gemma's 1 + weight shows)."""
    import transformers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sentencepiece_model)
    config = transformers.Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=7,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=8,
        max_position_embeddings=512,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return _with_random_norms(config, tokenizer, tmp_path_factory.mktemp("gemma3") / "model")


def test_gemma3_metadata_and_tensors(gemma3_model, tmp_path):
    reader = _export(gemma3_model, tmp_path / "g.gguf", "f32")
    fields, tensors = _fields(reader), _tensors(reader)
    assert fields["general.architecture"] == "gemma3"
    assert fields["gemma3.block_count"] == 7
    assert fields["gemma3.attention.sliding_window"] == 8
    assert fields["gemma3.rope.freq_base"] == pytest.approx(1_000_000.0)  # the global layers'
    assert fields["gemma3.rope.scaling.type"] == "linear"
    assert fields["gemma3.rope.scaling.factor"] == pytest.approx(8.0)
    assert "gemma3.final_logit_softcapping" not in fields
    assert fields["gemma3.rope.freq_base_swa"] == pytest.approx(10_000.0)  # the sliding layers'
    assert fields["gemma3.attention.sliding_window_pattern"] == [True] * 5 + [False, True]
    assert "output.weight" not in tensors  # tied
    assert tensors["blk.6.attn_q_norm.weight"].shape.tolist() == [16]
    assert tensors["blk.0.attn_q.weight"].shape.tolist() == [64, 64]
    assert tensors["blk.0.attn_k.weight"].shape.tolist() == [64, 32]
    hf = _hf_weights(gemma3_model)
    for name, hf_name in (
        ("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight"),
        ("blk.0.post_attention_norm.weight", "model.layers.0.post_attention_layernorm.weight"),
        ("blk.5.ffn_norm.weight", "model.layers.5.pre_feedforward_layernorm.weight"),
        ("blk.5.post_ffw_norm.weight", "model.layers.5.post_feedforward_layernorm.weight"),
        ("blk.3.attn_k_norm.weight", "model.layers.3.self_attn.k_norm.weight"),
        ("output_norm.weight", "model.norm.weight"),
    ):
        np.testing.assert_array_equal(_values(tensors[name]), hf[hf_name] + 1.0)
    # llama.cpp scales queries by 1/sqrt(head_dim = 16); the config says 1/sqrt(24): the rest is in the norm.
    np.testing.assert_allclose(
        _values(tensors["blk.3.attn_q_norm.weight"]),
        (hf["model.layers.3.self_attn.q_norm.weight"] + 1.0) * np.sqrt(16 / 24),
        rtol=1e-6,
    )
    np.testing.assert_array_equal(
        _values(tensors["blk.2.attn_q.weight"]), hf["model.layers.2.self_attn.q_proj.weight"]
    )


@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0"])
def test_gemma3_through_llama_cpp(gemma3_model, tmp_path, quant):
    pytest.importorskip("llama_cpp")
    # Longer than the 8-token window, so the sliding layers see only part of it.
    want, got = architectures.spm_logits(gemma3_model, tmp_path / f"gemma3-{quant}.gguf", quant)
    relative = np.abs(got - want).max() / np.abs(want).max()
    if quant == "f32":
        assert relative < 1e-3  # 4.4e-4 measured
    elif quant == "f16":
        assert relative < 1e-2  # 1.7e-3
    else:
        # As for Gemma 2: logits at most 0.8, median top-2 margin 0.037; 94% (11 of 184 flipped).
        _assert_flips_are_ties(want, got)


def test_gemma3_image_text_checkpoint_exports_its_language_model(sentencepiece_model, tmp_path):
    """Gemma 3 4B and up are Gemma3ForConditionalGeneration: the language model goes in, the vision tower and
    projector stay out (llama.cpp takes those as a separate mmproj file)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sentencepiece_model)
    text = transformers.Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    vision = transformers.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    # Image tokens are ids of the vocabulary; the last three stand in for them.
    n = len(tokenizer)
    config = transformers.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        image_token_index=n - 1,
        boi_token_index=n - 2,
        eoi_token_index=n - 3,
    )
    torch.manual_seed(0)
    folder = tmp_path / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    path = tmp_path / "g.gguf"
    reader = _export(folder, path, "f32")
    fields, tensors = _fields(reader), _tensors(reader)
    assert fields["general.architecture"] == "gemma3"
    assert fields["gemma3.embedding_length"] == 64
    assert fields["gemma3.block_count"] == 6
    # 6 layers of 13 tensors, the embedding and the final norm; tied, so no output.weight.
    assert len(tensors) == 6 * 13 + 2
    assert "blk.5.attn_q_norm.weight" in tensors and "output.weight" not in tensors
    if importlib.util.find_spec("llama_cpp") is None:
        return
    ids = tokenizer(" ".join(SPM_TEXTS * 2))["input_ids"]
    want = _transformers_logits(folder, ids)
    got, _ = _llama_cpp_logits(path, ids)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-3  # 4.6e-4 measured


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        (
            {
                "rope_parameters": {
                    "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                    "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
                }
            },
            "sliding layers use linear",
        ),
        ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
        ({"use_bidirectional_attention": True}, "EmbeddingGemma"),
    ],
)
def test_gemma3_llama_cpp_would_run_differently_is_refused(tmp_path, change, said):
    """What llama.cpp's gemma3 graph cannot express is refused (before any weight is read) rather than
    exported as another model."""
    import json

    import transformers

    folder = tmp_path / "model"
    folder.mkdir()
    config = transformers.Gemma3TextConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16, **change
    )
    config.architectures = ["Gemma3ForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    result = runner.invoke(app, ["export", str(folder), "--out", str(tmp_path / "g.gguf")])
    assert result.exit_code == 2
    assert said in result.output
    assert not (tmp_path / "g.gguf").exists()
