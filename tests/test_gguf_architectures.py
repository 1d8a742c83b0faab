"""`qalign export` of the architectures beyond the Llama family's basics: Llama 3 RoPE factors, SentencePiece
vocabularies, Phi-3's fused tensors (Gemma: test_gguf_gemma.py); read back with the gguf package's reader
and, where llama-cpp-python is installed, run by llama.cpp."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from test_gguf import (  # noqa: E402
    TEXT,
    T,
    _export,
    _fields,
    _hf_weights,
    _llama_cpp_logits,
    _save_random_model,
    _tensors,
    _transformers_logits,
    _values,
    runner,
)

from qalign.cli import app  # noqa: E402
from qalign.gguf_export import export_gguf  # noqa: E402
from qalign.gguf_quant import quantize  # noqa: E402
from qalign.gguf_vocab import CONTROL  # noqa: E402
from qalign.progress import Progress  # noqa: E402


@pytest.fixture(scope="module")
def llama3_rope_model(tmp_path_factory) -> Path:
    """Llama 3.1/3.2's RoPE (frequencies rescaled by wavelength), with a short original context so that every
    branch of the rescaling applies to a 16-dim head."""
    import transformers
    from conftest import TOKENIZER
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("llama3rope") / "model"
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    config = transformers.LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=10000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _save_random_model(config, tokenizer, folder)


def test_llama3_rope_factors_match_transformers(llama3_rope_model, tmp_path):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    reader = _export(llama3_rope_model, tmp_path / "r.gguf", "q8_0")
    tensors = _tensors(reader)
    assert "output.weight" not in tensors  # tied
    factors = tensors["rope_freqs.weight"]
    assert factors.tensor_type == T.F32
    config = AutoConfig.from_pretrained(llama3_rope_model)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    np.testing.assert_allclose(_values(factors), (plain / scaled).numpy(), rtol=1e-5)
    assert len(set(np.round(_values(factors), 3))) >= 3  # unscaled, smoothed and fully scaled frequencies


def test_llama3_rope_through_llama_cpp(llama3_rope_model, tmp_path):
    pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    path = tmp_path / "r.gguf"
    export_gguf(llama3_rope_model, path, "f32", Progress())
    ids = AutoTokenizer.from_pretrained(llama3_rope_model)(TEXT)["input_ids"]
    want = _transformers_logits(llama3_rope_model, ids)
    got, _ = _llama_cpp_logits(path, ids)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-3


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 4.0},
        # The text is 36 tokens: past the original 16, where YaRN interpolates.
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    ],
    ids=["linear", "yarn"],
)
def test_rope_scaling_through_llama_cpp(rope, tmp_path):
    import transformers
    from conftest import TOKENIZER
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    config = transformers.LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_parameters={**rope, "rope_theta": 10000.0},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = _save_random_model(config, tokenizer, tmp_path / "model")
    path = tmp_path / "r.gguf"
    fields = _fields(_export(model, path, "f32"))
    assert fields["llama.rope.scaling.type"] == rope["rope_type"]
    assert fields["llama.rope.scaling.factor"] == pytest.approx(4.0)
    if rope["rope_type"] == "yarn":
        assert fields["llama.rope.scaling.original_context_length"] == 16
    if importlib.util.find_spec("llama_cpp") is None:
        return
    ids = tokenizer(TEXT)["input_ids"]
    want = _transformers_logits(model, ids)
    got, _ = _llama_cpp_logits(path, ids)
    # This random model attends almost uniformly, so RoPE moves its logits little: without the scaling in the
    # file llama.cpp is off by 0.7% (linear) and 0.65% (yarn); with it, by 4e-7. Hence a bound tighter than
    # the other f32 comparisons'.
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4


def test_yarn_with_parameters_llama_cpp_would_not_read_is_refused(tmp_path):
    import json

    import transformers

    folder = tmp_path / "model"
    folder.mkdir()
    rope = {"rope_type": "yarn", "factor": 4.0, "beta_fast": 16, "rope_theta": 10000.0}
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, num_hidden_layers=2, rope_parameters=rope
    )
    config.architectures = ["LlamaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    result = runner.invoke(app, ["export", str(folder), "--out", str(tmp_path / "r.gguf")])
    assert result.exit_code == 2
    assert "beta_fast" in result.output


SPM_TEXTS = [
    "Hello world, ünïcode 🙂 2024",
    "The quick brown fox  jumps\nover the lazy dog.",
    " leading space",
    "[INST] What is 3 + 4? [/INST] The answer is 7.</s>",
]


def spm_logits(model: Path, path: Path, quant: str) -> tuple[np.ndarray, np.ndarray]:
    """(transformers' logits, llama.cpp's) over all the SentencePiece texts, twice (long enough that top-1
    agreement does not hang on one near-tie of a random model), with `model` exported to `path` as `quant`."""
    from transformers import AutoTokenizer

    export_gguf(model, path, quant, Progress())
    ids = AutoTokenizer.from_pretrained(model)(" ".join(SPM_TEXTS * 2))["input_ids"]
    return _transformers_logits(model, ids), _llama_cpp_logits(path, ids)[0]


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory) -> Path:
    """A tiny Llama with a tokenizer laid out as transformers converts SentencePiece ones (Llama 2, Mistral):
    byte-fallback BPE, "▁" for spaces and before the text, merges being every split of a token into two."""
    import transformers
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = "the quick brown fox jumps over lazy dog what is answer hello world recipe merge export model"
    corpus = [" ".join(words.split()[i:] + words.split()[:i]) for i in range(18)] * 4
    trainer = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for token, _ in sorted(trainer.get_vocab().items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    pieces = sorted((i, t) for t, i in vocab.items() if not t.startswith("<"))
    merges = [
        (t[:k], t[k:]) for _, t in pieces for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab
    ]
    spm = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    spm.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    spm.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    from tokenizers.processors import TemplateProcessing

    spm.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    spm.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=spm, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    folder = tmp_path_factory.mktemp("spm") / "model"
    config = transformers.LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
    )
    return _save_random_model(config, tokenizer, folder)


def test_sentencepiece_vocab_fields(sentencepiece_model, tmp_path):
    from transformers import AutoTokenizer

    from qalign.gguf_vocab import BYTE, UNKNOWN

    fields = _fields(_export(sentencepiece_model, tmp_path / "s.gguf", "f16"))
    tokenizer = AutoTokenizer.from_pretrained(sentencepiece_model)
    assert fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.add_space_prefix"] is True
    assert fields["tokenizer.ggml.add_bos_token"] is True  # the tokenizer adds <s>
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["tokenizer.ggml.eos_token_id"] == 2
    types = fields["tokenizer.ggml.token_type"]
    assert types[0] == UNKNOWN and types[1] == CONTROL and types[3] == BYTE and types[258] == BYTE
    assert fields["tokenizer.ggml.tokens"] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    scores = fields["tokenizer.ggml.scores"]
    # Longer pieces come from later merges, so they score lower than the pieces they are made of.
    vocab = tokenizer.get_vocab()
    joined = next(
        t for t in vocab if len(t) > 3 and not t.startswith("<") and t[:2] in vocab and t[2:] in vocab
    )
    assert scores[vocab[joined]] < max(scores[vocab[joined[:2]]], scores[vocab[joined[2:]]])


def test_sentencepiece_through_llama_cpp(sentencepiece_model, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    path = tmp_path / "s.gguf"
    export_gguf(sentencepiece_model, path, "f32", Progress())
    tokenizer = AutoTokenizer.from_pretrained(sentencepiece_model)
    llm = llama_cpp.Llama(str(path), n_ctx=128, verbose=False, n_threads=2)
    for text in SPM_TEXTS:
        # add_bos=True as the file says; byte fallback for the emoji and accented letters.
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer(text)["input_ids"], text
    llm.close()
    ids = tokenizer(SPM_TEXTS[1])["input_ids"]
    want = _transformers_logits(sentencepiece_model, ids)
    got, _ = _llama_cpp_logits(path, ids)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-3


@pytest.fixture(scope="module")
def phi3_model(sentencepiece_model, tmp_path_factory) -> Path:
    """A tiny Phi-3 with a SentencePiece-style tokenizer carrying Phi-3's own special tokens (llama.cpp looks
    them up by name when loading a phi3 model)."""
    import transformers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sentencepiece_model)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|end|>"]})
    config = transformers.Phi3Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    folder = tmp_path_factory.mktemp("phi3") / "model"
    return _save_random_model(config, tokenizer, folder)


def test_phi3_fused_tensors(phi3_model, tmp_path):
    reader = _export(phi3_model, tmp_path / "phi3.gguf", "f32")
    tensors = _tensors(reader)
    assert _fields(reader)["general.architecture"] == "phi3"
    hf = _hf_weights(phi3_model)
    # Q, K and V in one matrix (64 + 32 + 32 rows), gate and up in another (2 x 128 rows), unpermuted.
    np.testing.assert_array_equal(
        _values(tensors["blk.0.attn_qkv.weight"]), hf["model.layers.0.self_attn.qkv_proj.weight"]
    )
    np.testing.assert_array_equal(
        _values(tensors["blk.1.ffn_up.weight"]), hf["model.layers.1.mlp.gate_up_proj.weight"]
    )
    assert tensors["blk.1.ffn_up.weight"].shape.tolist() == [64, 256]


@pytest.mark.parametrize("quant", ["f32", "q8_0"])
def test_phi3_through_llama_cpp(phi3_model, tmp_path, quant):
    pytest.importorskip("llama_cpp")
    want, got = spm_logits(phi3_model, tmp_path / f"phi3-{quant}.gguf", quant)
    if quant == "f32":
        assert np.abs(got - want).max() / np.abs(want).max() < 1e-3
    else:
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.95


def test_file_named_phi3_still_loads_as_llama(tiny_model, tmp_path):
    fields = _fields(_export(tiny_model("llama"), tmp_path / "not-phi3.gguf", "f16"))
    assert fields["general.name"] == "not-phi_3"


def test_failure_midway_leaves_no_file(tiny_model, tmp_path, monkeypatch):
    import qalign.gguf_export as gguf_export

    calls = []

    def failing(data, qtype):
        calls.append(qtype)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return quantize(data, qtype)

    monkeypatch.setattr(gguf_export, "quantize", failing)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(tiny_model("llama"), tmp_path / "x.gguf", "q8_0", Progress())
    assert list(tmp_path.iterdir()) == []
