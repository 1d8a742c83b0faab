"""`qalign export`: GGUF files read back with the gguf package's own reader and checked against the
transformers model; and, where llama-cpp-python is installed, run by llama.cpp and compared logit by logit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

gguf = pytest.importorskip("gguf")

from qalign.cli import app  # noqa: E402
from qalign.errors import UserError  # noqa: E402
from qalign.gguf_export import export_gguf  # noqa: E402
from qalign.gguf_quant import dequantize, quantize, tensor_type  # noqa: E402
from qalign.gguf_vocab import CONTROL, NORMAL, UNUSED, pre_tokenizer_name  # noqa: E402
from qalign.progress import Progress  # noqa: E402

T = gguf.GGMLQuantizationType
runner = CliRunner()


def _export(model: Path, out: Path, quant: str) -> gguf.GGUFReader:
    export_gguf(model, out, quant, Progress(), overwrite=True)
    return gguf.GGUFReader(out)


def _fields(reader: gguf.GGUFReader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def _tensors(reader: gguf.GGUFReader) -> dict:
    return {t.name: t for t in reader.tensors}


def _values(tensor) -> np.ndarray:
    """A GGUF tensor as float32 in numpy (transformers) order."""
    return dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(
        tuple(reversed(tensor.shape.tolist()))
    )


def _hf_weights(model: Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    return {k: v.float().numpy() for k, v in load_file(model / "model.safetensors").items()}


def _interleave(weight: np.ndarray, heads: int) -> np.ndarray:
    """Per head, rows (0, d/2, 1, d/2+1, ...): the pairs llama.cpp rotates, written independently of the
    exporter's reshape."""
    d = weight.shape[0] // heads
    order = [h * d + (i // 2 if i % 2 == 0 else d // 2 + i // 2) for h in range(heads) for i in range(d)]
    return weight[order]


def _save_random_model(config: object, tokenizer: object, folder: Path) -> Path:
    """A seeded random-weight model from `config`, saved with `tokenizer` as a transformers folder."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _transformers_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    """The fp32 transformers model's logits for `ids`: what llama.cpp's must match."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.fixture(scope="module")
def llama_f32(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    return tiny_model("llama"), _export(tiny_model("llama"), out, "f32")


def test_llama_metadata(llama_f32):
    model, reader = llama_f32
    config = json.loads((model / "config.json").read_text())
    fields = _fields(reader)
    assert fields["general.architecture"] == "llama"
    assert fields["general.file_type"] == 0
    assert fields["llama.context_length"] == config["max_position_embeddings"] == 512
    assert fields["llama.embedding_length"] == 64
    assert fields["llama.feed_forward_length"] == 128
    assert fields["llama.block_count"] == 2
    assert fields["llama.attention.head_count"] == 4
    assert fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.rope.dimension_count"] == 16
    assert fields["llama.vocab_size"] == 1000
    assert fields["llama.rope.freq_base"] == pytest.approx(config["rope_parameters"]["rope_theta"])
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"])


def test_llama_tensors_exact_with_qk_interleaved(llama_f32):
    model, reader = llama_f32
    hf = _hf_weights(model)
    tensors = _tensors(reader)
    expected = {"token_embd.weight", "output_norm.weight"}
    for i in range(2):
        for part in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate"):
            expected.add(f"blk.{i}.{part}.weight")
        expected |= {f"blk.{i}.ffn_up.weight", f"blk.{i}.ffn_down.weight"}
    assert set(tensors) == expected | {"output.weight"}  # LlamaConfig does not tie by default
    np.testing.assert_array_equal(_values(tensors["output.weight"]), hf["lm_head.weight"])
    assert all(t.tensor_type == T.F32 for t in tensors.values())
    np.testing.assert_array_equal(_values(tensors["token_embd.weight"]), hf["model.embed_tokens.weight"])
    np.testing.assert_array_equal(
        _values(tensors["blk.1.attn_q.weight"]), _interleave(hf["model.layers.1.self_attn.q_proj.weight"], 4)
    )
    np.testing.assert_array_equal(
        _values(tensors["blk.1.attn_k.weight"]), _interleave(hf["model.layers.1.self_attn.k_proj.weight"], 2)
    )
    np.testing.assert_array_equal(
        _values(tensors["blk.0.attn_v.weight"]), hf["model.layers.0.self_attn.v_proj.weight"]
    )
    np.testing.assert_array_equal(
        _values(tensors["blk.0.ffn_down.weight"]), hf["model.layers.0.mlp.down_proj.weight"]
    )
    np.testing.assert_array_equal(_values(tensors["output_norm.weight"]), hf["model.norm.weight"])


def test_tokenizer_fields(llama_f32):
    from transformers import AutoTokenizer

    model, reader = llama_f32
    tokenizer = AutoTokenizer.from_pretrained(model)
    spec = json.loads((model / "tokenizer.json").read_text())
    fields = _fields(reader)
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == 1000
    assert tokens == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    types = fields["tokenizer.ggml.token_type"]
    assert types[tokenizer.convert_tokens_to_ids("<|im_end|>")] == CONTROL
    assert types[tokenizer.convert_tokens_to_ids("Ġthe")] == NORMAL
    assert UNUSED not in types
    merges = spec["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    assert fields["tokenizer.ggml.eot_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    # The test tokenizer has a BOS token but does not add it; llama.cpp must not add it either.
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template


def test_modelfile_has_template_and_stops(llama_f32, tmp_path):
    model, _ = llama_f32
    result = runner.invoke(app, ["export", str(model), "--out", str(tmp_path / "m.gguf"), "--quant", "f16"])
    assert result.exit_code == 0, result.output
    assert "ollama create m -f" in result.output and "llama-cli -m" in result.output
    text = (tmp_path / "m.Modelfile").read_text()
    assert text.startswith("FROM ./m.gguf\n")
    assert "<|im_start|>{{ .Role }}" in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|endoftext|>"' in text
    again = runner.invoke(app, ["export", str(model), "--out", str(tmp_path / "m.gguf")])
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert _fields(gguf.GGUFReader(tmp_path / "m.gguf"))["general.file_type"] == 1  # untouched f16
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize(
    "quant, bound",
    [
        # Relative rounding of one value: f16 keeps 11 significant bits, bf16 8.
        ("f16", lambda x, amax: np.abs(x) * 2**-11 + 6e-8),
        ("bf16", lambda x, amax: np.abs(x) * 2**-8),
        # Q8_0: half a step of amax/127 per 32-value block, plus the f16 rounding of that step times up to 127.
        ("q8_0", lambda x, amax: amax / 127 * (0.5 + 127 * 2**-11) + 1e-9),
    ],
)
def test_rounded_types_within_bounds(tiny_model, tmp_path, quant, bound):
    model = tiny_model("llama")
    reader = _export(model, tmp_path / f"{quant}.gguf", quant)
    hf = _hf_weights(model)
    tensors = _tensors(reader)
    want = {"f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}[quant]
    assert tensors["blk.0.ffn_up.weight"].tensor_type == want
    assert tensors["blk.0.attn_norm.weight"].tensor_type == T.F32
    x = hf["model.layers.0.mlp.up_proj.weight"]
    got = _values(tensors["blk.0.ffn_up.weight"])
    amax = np.repeat(np.abs(x.reshape(-1, 32)).max(-1), 32).reshape(x.shape)
    assert np.all(np.abs(got - x) <= bound(x, amax))


def test_q4_k_m_mix_and_fallbacks(recipe_free_demo, tmp_path):
    reader = _export(recipe_free_demo, tmp_path / "q4.gguf", "q4_k_m")
    tensors = _tensors(reader)
    # Tied embeddings: no output.weight, llama.cpp reuses token_embd (and so it gets the output's Q6_K).
    assert "output.weight" not in tensors
    assert _fields(reader)["general.file_type"] == 15
    # Demo: hidden 256 (K-quants fit), intermediate 576 (ffn_down rows do not), 4 layers, tied embeddings.
    assert tensors["token_embd.weight"].tensor_type == T.Q6_K
    assert tensors["blk.0.attn_q.weight"].tensor_type == T.Q4_K
    assert tensors["blk.0.attn_v.weight"].tensor_type == T.Q4_K
    assert tensors["blk.3.attn_v.weight"].tensor_type == T.Q6_K
    assert tensors["blk.0.ffn_down.weight"].tensor_type == T.Q5_0
    assert tensors["blk.3.ffn_down.weight"].tensor_type == T.Q8_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == T.F32
    hf = _hf_weights(recipe_free_demo)
    for name, hf_name in (
        ("blk.0.ffn_gate.weight", "model.layers.0.mlp.gate_proj.weight"),
        ("token_embd.weight", "model.embed_tokens.weight"),
    ):
        x, got = hf[hf_name], _values(tensors[name])
        assert np.sqrt(((got - x) ** 2).mean() / (x**2).mean()) < 0.1


def test_q4_k_m_layers_with_more_bits():
    # Checked against llama.cpp's quantizer on 9-layer Llama, Qwen2, Gemma 2 and Phi-3 models (hidden 256):
    # layers 0, 3, 6, 7 and 8 get Q6_K in attn_v / Phi-3's fused attn_qkv and in ffn_down.
    more = [
        i for i in range(9) if tensor_type(f"blk.{i}.attn_v.weight", (256, 256), "q4_k_m", 9, True) == T.Q6_K
    ]
    assert more == [0, 3, 6, 7, 8]
    for name in ("attn_qkv", "ffn_down"):
        assert tensor_type(f"blk.3.{name}.weight", (256, 256), "q4_k_m", 9, True) == T.Q6_K
        assert tensor_type(f"blk.4.{name}.weight", (256, 256), "q4_k_m", 9, True) == T.Q4_K
    assert tensor_type("blk.3.attn_q.weight", (256, 256), "q4_k_m", 9, True) == T.Q4_K
    assert tensor_type("output.weight", (1000, 256), "q4_k_m", 9, True) == T.Q6_K
    assert tensor_type("token_embd.weight", (1000, 256), "q4_k_m", 9, True) == T.Q4_K


def test_tensor_type_fallbacks():
    assert tensor_type("blk.0.attn_q.weight", (64, 64), "q4_k_m", 2, False) == T.Q5_0
    assert tensor_type("token_embd.weight", (1000, 64), "q4_k_m", 2, False) == T.Q8_0
    assert tensor_type("blk.0.attn_q.weight", (64, 48), "q8_0", 2, False) == T.F16
    assert tensor_type("blk.0.attn_norm.weight", (64,), "q8_0", 2, False) == T.F32


@pytest.mark.parametrize("qtype, limit", [(T.Q4_K, 0.08), (T.Q6_K, 0.02)])
def test_k_quants_round_trip(qtype, limit):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 512)) * 0.02).astype(np.float32)
    x[3, :256] = 0.0  # an all-zero super-block must stay zero, not NaN
    x[4, :256] = 0.5  # a constant, positive one
    raw = quantize(x, qtype)
    assert raw.shape == (64, 512 // 256 * gguf.GGML_QUANT_SIZES[qtype][1])
    got = dequantize(raw, qtype)
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(got[3, :256], 0.0)
    np.testing.assert_allclose(got[4, :256], 0.5, rtol=0.01)
    assert np.sqrt(((got - x) ** 2).mean() / (x**2).mean()) < limit


def test_qwen2_biases_and_no_permutation(tiny_model, tmp_path):
    model = tiny_model("qwen2")
    reader = _export(model, tmp_path / "q.gguf", "f32")
    assert _fields(reader)["general.architecture"] == "qwen2"
    assert _fields(reader)["qwen2.attention.head_count_kv"] == 2
    # Same tokenizer.json as the Llama, but transformers loads it as Qwen2Tokenizer, which splits digits one by
    # one: the pre-tokenizer follows the tokenizer as loaded.
    assert _fields(reader)["tokenizer.ggml.pre"] == "qwen2"
    hf = _hf_weights(model)
    tensors = _tensors(reader)
    np.testing.assert_array_equal(
        _values(tensors["blk.0.attn_q.weight"]), hf["model.layers.0.self_attn.q_proj.weight"]
    )
    np.testing.assert_array_equal(
        _values(tensors["blk.0.attn_k.bias"]), hf["model.layers.0.self_attn.k_proj.bias"]
    )


def test_unsupported_architecture_exits_2_naming_supported(tiny_model, tmp_path):
    result = runner.invoke(app, ["export", str(tiny_model("gpt2")), "--out", str(tmp_path / "g.gguf")])
    assert result.exit_code == 2
    assert "GPT2LMHeadModel" in result.output and "LlamaForCausalLM" in result.output
    assert not (tmp_path / "g.gguf").exists()


def test_recipe_without_merged_model_says_merge_first(tiny_model, tmp_path):
    from conftest import write_recipe

    recipe = write_recipe(tmp_path, tiny_model("llama"))
    result = runner.invoke(app, ["export", str(recipe), "--out", str(tmp_path / "r.gguf")])
    assert result.exit_code == 2
    assert "qalign merge" in result.output and "no merged model" in result.output


def test_recipe_export_section(tiny_model, tmp_path):
    import yaml
    from conftest import write_recipe

    from qalign.gguf_export import export_recipe
    from qalign.recipe_load import load_recipe

    path = write_recipe(tmp_path, tiny_model("llama"))
    raw = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**raw, "export": {"gguf": ["f16", "q8_0"]}}))
    with pytest.raises(UserError, match="add a `merge:` section"):
        load_recipe(path)
    path.write_text(yaml.safe_dump({**raw, "merge": {}, "export": {"gguf": ["f16", "q8_0"]}}))
    recipe = load_recipe(path)
    with pytest.raises(UserError, match="no merged model yet"):
        export_recipe(recipe, Progress())
    # Stands in for `qalign merge`: a merged folder is a plain model folder and its report.
    merged = recipe.out / "merged"
    shutil.copytree(tiny_model("llama"), merged)
    report = {"base": "b", "adapter_sha256": "aaaa", "dtype": "bf16", "fidelity": {"mean_kl": 1e-7}}
    (merged / "merge_report.json").write_text(json.dumps(report))
    written = export_recipe(recipe, Progress())
    gguf_dir = recipe.out / "gguf"
    assert written == [gguf_dir / "tiny-f16.gguf", gguf_dir / "tiny-q8_0.gguf"]
    assert (gguf_dir / "tiny-q8_0.Modelfile").is_file()
    assert _fields(gguf.GGUFReader(written[1]))["general.file_type"] == 7
    stamps = [p.stat().st_mtime_ns for p in written]
    # Merged again from the same adapter (other fidelity figures): the files stay.
    (merged / "merge_report.json").write_text(json.dumps({**report, "fidelity": {"mean_kl": 2e-7}}))
    export_recipe(recipe, Progress())
    assert [p.stat().st_mtime_ns for p in written] == stamps
    # From another adapter: both are written again.
    (merged / "merge_report.json").write_text(json.dumps({**report, "adapter_sha256": "bbbb"}))
    export_recipe(recipe, Progress())
    assert all(p.stat().st_mtime_ns != s for p, s in zip(written, stamps, strict=True))
    assert "bbbb" in _fields(gguf.GGUFReader(written[0]))["qalign.merged_from"]


def test_run_refuses_an_unexportable_base_before_training(tiny_model, tmp_path):
    import yaml
    from conftest import write_recipe

    path = write_recipe(tmp_path, tiny_model("gpt2"))
    raw = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**raw, "merge": {}, "export": {"gguf": ["q8_0"]}}))
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2
    assert "GPT2LMHeadModel is not supported" in result.output
    assert not (tmp_path / "runs" / "tiny" / "sft").exists()


def test_unknown_pre_tokenizer_refused():
    spec = {"normalizer": None, "pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}}
    with pytest.raises(UserError, match="matches none that llama"):
        pre_tokenizer_name(spec)
    prefix = {"normalizer": None, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True}}
    with pytest.raises(UserError):
        pre_tokenizer_name(prefix)
    llama3 = {
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {
                        "Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
                    },
                    "behavior": "Isolated",
                    "invert": False,
                },
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
    }
    assert pre_tokenizer_name(llama3) == "llama-bpe"


@pytest.fixture(scope="module")
def qwen3_model(tmp_path_factory) -> Path:
    """A tiny Qwen3 built as conftest builds its models (conftest's list is shared with the training tests,
    which check it, so it is not extended from here)."""
    import transformers
    from conftest import TOKENIZER
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("qwen3") / "qwen3"
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    config = transformers.Qwen3Config(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _save_random_model(config, tokenizer, folder)


def test_qwen3_q_k_norms(qwen3_model, tmp_path):
    reader = _export(qwen3_model, tmp_path / "q3.gguf", "q8_0")
    tensors = _tensors(reader)
    assert _fields(reader)["general.architecture"] == "qwen3"
    assert tensors["blk.0.attn_q_norm.weight"].tensor_type == T.F32
    hf = _hf_weights(qwen3_model)
    np.testing.assert_array_equal(
        _values(tensors["blk.1.attn_k_norm.weight"]), hf["model.layers.1.self_attn.k_norm.weight"]
    )


@pytest.fixture(scope="module")
def recipe_free_demo(tmp_path_factory) -> Path:
    return Path(__file__).parent.parent / "recipes" / "demo-model"


# --- llama.cpp itself -------------------------------------------------------------------------------------

TEXT = (
    "<|im_start|>user\nWhat is 3 + 4? Tell me.<|im_end|>\n<|im_start|>assistant\nThe answer is 7, it's 2024!"
)


def _llama_cpp_logits(path: Path, ids: list[int]) -> tuple[np.ndarray, list[int]]:
    llama_cpp = pytest.importorskip("llama_cpp")
    # F32 K/V cache (type 0): llama.cpp's default f16 cache would add its own rounding to the comparison.
    llm = llama_cpp.Llama(
        str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2, type_k=0, type_v=0
    )
    tokens = llm.tokenize(TEXT.encode(), add_bos=False, special=True)
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return logits, tokens


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "qwen3"])
@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0"])
def test_llama_cpp_logits_match_transformers(tiny_model, qwen3_model, tmp_path, arch, quant):
    pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    model_dir = qwen3_model if arch == "qwen3" else tiny_model(arch)
    path = tmp_path / f"{arch}-{quant}.gguf"
    export_gguf(model_dir, path, quant, Progress(), overwrite=True)
    ids = AutoTokenizer.from_pretrained(model_dir)(TEXT)["input_ids"]
    want = _transformers_logits(model_dir, ids)
    got, tokens = _llama_cpp_logits(path, ids)
    assert tokens == ids  # llama.cpp's pre-tokenizer and BPE split the text exactly as the HF tokenizer
    relative = np.abs(got - want).max() / np.abs(want).max()
    if quant == "f32":
        assert relative < 1e-3
    elif quant == "f16":
        assert relative < 1e-2
    else:
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.95


def test_export_cli_copies_nothing_else(tiny_model, tmp_path):
    # A model folder copied elsewhere exports the same: the source is only read.
    source = tmp_path / "model"
    shutil.copytree(tiny_model("llama"), source)
    before = sorted(p.name for p in source.iterdir())
    result = runner.invoke(
        app, ["export", str(source), "--out", str(tmp_path / "o" / "x.gguf"), "--quant", "bf16"]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in source.iterdir()) == before
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["x.Modelfile", "x.gguf"]


def test_q4_k_m_matches_llama_cpps_own_quantizer(recipe_free_demo, tmp_path):
    """The same type for every tensor as llama.cpp's quantizer picks from the f32 file, and a weight error
    within a few percent of its own."""
    import ctypes

    llama_cpp = pytest.importorskip("llama_cpp")
    ours = _export(recipe_free_demo, tmp_path / "ours.gguf", "q4_k_m")
    f32 = _export(recipe_free_demo, tmp_path / "f32.gguf", "f32")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    params.nthread = 2
    theirs_path = tmp_path / "theirs.gguf"
    assert (
        llama_cpp.llama_model_quantize(
            str(tmp_path / "f32.gguf").encode(), str(theirs_path).encode(), ctypes.byref(params)
        )
        == 0
    )
    ours, theirs, exact = _tensors(ours), _tensors(gguf.GGUFReader(theirs_path)), _tensors(f32)
    assert {n: t.tensor_type for n, t in ours.items()} == {n: t.tensor_type for n, t in theirs.items()}
    for name, tensor in exact.items():
        x = _values(tensor)
        if ours[name].tensor_type == T.F32:
            np.testing.assert_array_equal(_values(ours[name]), x)
            continue
        ours_err = np.sqrt(((_values(ours[name]) - x) ** 2).mean())
        theirs_err = np.sqrt(((_values(theirs[name]) - x) ** 2).mean())
        assert ours_err <= theirs_err * 1.05, name
