"""jlora.hf.gguf_export: merged Llama fine-tunes written as GGUF, read back with jlora's own GGUF reader.

Tiny models take their tokenizer fields from a tiny GGUF made here (128 tokens: parsing SmolLM2's
49152 tokens costs seconds per file); the shipped SmolLM2 GGUF is exported and read back whole.
"""
import gguf
import jax
import numpy as np
import pytest
import transformers as tf
from hypothesis import given, settings
from hypothesis import strategies as st

import jlora
import jlora.hf
from jlora.hf.gguf_export import _permute, export_gguf
from jlora.hf.llama import FlaxLlamaForCausalLMFixed, _unpermute, read_gguf_llama, read_gguf_tokenizer
from jlora.tree import flatten, unflatten

IDS = np.array([[1, 54, 58, 14, 44, 114, 60, 3, 30, 78, 118, 28]], np.int32)
VOCAB = 128
TEXT = "LoRA freezes 12345 weights.\n<|im_start|>user\nHi there!<|im_end|> ünïcödé 😀"
LORA_CONFIG = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"))


@pytest.fixture(scope="module")
def smollm2():
    return jlora.hf.smollm2_gguf_path()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A GGUF holding only tokenizer fields of every value type a real one has, for a 128-token vocabulary."""
    path = tmp_path_factory.mktemp("tok") / "tok.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny source")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list([f"t{i}" for i in range(VOCAB)])
    writer.add_token_types([3] * 3 + [1] * (VOCAB - 3))
    writer.add_token_merges(["t 1", "t 2", "t1 2"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_llama(tied: bool, vocab_size: int = VOCAB) -> FlaxLlamaForCausalLMFixed:
    config = tf.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=64, rope_theta=100000.0,
                            rms_norm_eps=1e-6, tie_word_embeddings=tied)
    return FlaxLlamaForCausalLMFixed(config, seed=0)


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def adapted(request):
    """A tiny Llama and an adapter with non-zero lora_b (so the merge changes q and v)."""
    model = tiny_llama(request.param)
    lora = jlora.init(jax.random.PRNGKey(0), model.params, LORA_CONFIG)
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 100))
    lora = unflatten({k: 0.1 * jax.random.normal(next(keys), v.shape) if k[-1] == "lora_b" else v
                      for k, v in flatten(lora).items()})
    return model, lora


def fields(reader) -> dict:
    return {k: (f.types, f.contents()) for k, f in reader.fields.items()}


def tokenizer_fields(reader) -> dict:
    return {k: v for k, v in fields(reader).items() if k.startswith("tokenizer.")}


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_merged_export_gives_the_adapted_logits(adapted, source, tmp_path, dtype):
    model, lora = adapted
    out = export_gguf(tmp_path / "m.gguf", model, model.params, lora, LORA_CONFIG, source_gguf=source, dtype=dtype)
    config, params = read_gguf_llama(out)
    assert ("lm_head" in params) == (not model.config.tie_word_embeddings)
    expected = np.asarray(jlora.apply(model, LORA_CONFIG)(model.params, lora, IDS).logits)
    got = np.asarray(FlaxLlamaForCausalLMFixed(config, _do_init=False)(IDS, params=params).logits)
    diff, scale = np.abs(got - expected).max(), np.abs(expected).max()
    print(f"{dtype} tied={model.config.tie_word_embeddings}: max |logit diff| {diff:.3g} (logits up to {scale:.3g})")
    assert diff < (1e-5 if dtype == "f32" else 1e-2 * scale)
    base = np.asarray(model(IDS).logits)
    assert np.abs(base - expected).max() > 100 * diff  # the adapter matters at this tolerance
    reader = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type for t in reader.tensors}
    two_d = gguf.GGMLQuantizationType.F32 if dtype == "f32" else gguf.GGMLQuantizationType.F16
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.1.attn_q.weight"] == types["token_embd.weight"] == two_d
    assert reader.fields["general.file_type"].contents() == {"f32": 0, "f16": 1}[dtype]
    assert tokenizer_fields(reader) == tokenizer_fields(gguf.GGUFReader(str(source)))  # values and value types


def test_config_fields_read_back(adapted, source, tmp_path):
    model, _ = adapted
    out = export_gguf(tmp_path / "base.gguf", model, model.params, None, None, source_gguf=source, name="tiny")
    config, params = read_gguf_llama(out)
    want = model.config
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "rope_theta", "tie_word_embeddings"):
        assert getattr(config, key) == getattr(want, key), key
    assert config.rms_norm_eps == pytest.approx(want.rms_norm_eps, rel=1e-6)  # stored as float32
    meta = {k: v for k, (_, v) in fields(gguf.GGUFReader(str(out))).items()}
    assert meta["general.architecture"] == "llama" and meta["general.name"] == "tiny"
    assert meta["llama.rope.dimension_count"] == 16 and meta["llama.vocab_size"] == VOCAB
    for path, leaf in flatten(model.params).items():  # the plain base: every tensor back bit for bit
        np.testing.assert_array_equal(flatten(params)[path], np.asarray(leaf), err_msg="/".join(path))


def test_smollm2_round_trip_keeps_tensors_and_tokenizer(smollm2, tmp_path):
    config, params = read_gguf_llama(smollm2)
    model = FlaxLlamaForCausalLMFixed(config, _do_init=False)
    out = export_gguf(tmp_path / "smollm2.gguf", model, params, None, None, source_gguf=smollm2)
    config2, params2 = read_gguf_llama(out)
    assert config2.to_dict() == config.to_dict()
    flat, flat2 = flatten(params), flatten(params2)
    assert flat.keys() == flat2.keys()
    for path in flat:
        np.testing.assert_array_equal(flat2[path], flat[path], err_msg="/".join(path))
    assert tokenizer_fields(gguf.GGUFReader(str(out))) == tokenizer_fields(gguf.GGUFReader(str(smollm2)))
    original, exported = read_gguf_tokenizer(smollm2), read_gguf_tokenizer(out)
    assert exported.encode(TEXT) == original.encode(TEXT)
    assert exported.chat_template == original.chat_template and "<|im_start|>" in exported.chat_template


def test_transformers_tokenizer_writes_the_same_vocabulary(smollm2, tmp_path):
    model = tiny_llama(True, vocab_size=49152)
    tokenizer = read_gguf_tokenizer(smollm2)  # a PreTrainedTokenizerFast for SmolLM2's byte-level BPE
    out = export_gguf(tmp_path / "t.gguf", model, model.params, None, None, tokenizer=tokenizer)
    theirs, ours = tokenizer_fields(gguf.GGUFReader(str(smollm2))), tokenizer_fields(gguf.GGUFReader(str(out)))
    assert ours["tokenizer.ggml.model"][1] == "gpt2"
    for key in ("ggml.tokens", "ggml.token_type", "ggml.merges", "ggml.bos_token_id", "ggml.eos_token_id",
                "ggml.padding_token_id", "chat_template"):
        assert ours[f"tokenizer.{key}"] == theirs[f"tokenizer.{key}"], key  # values and value types
    exported = read_gguf_tokenizer(out)
    assert exported.encode(TEXT) == tokenizer.encode(TEXT)
    assert exported.chat_template == tokenizer.chat_template


@settings(max_examples=50, deadline=None)
@given(heads=st.integers(1, 6), half=st.integers(1, 6), cols=st.integers(1, 5), seed=st.integers(0, 2**31))
def test_permute_is_the_inverse_of_unpermute(heads, half, cols, seed):
    w = np.random.default_rng(seed).standard_normal((heads * 2 * half, cols)).astype(np.float32)
    np.testing.assert_array_equal(_permute(_unpermute(w, heads), heads), w)
    np.testing.assert_array_equal(_unpermute(_permute(w, heads), heads), w)
    if half > 1:  # and it really moves rows: llama.cpp's order interleaves HF's two rotary halves
        assert not np.array_equal(_permute(w, heads), w)


def test_existing_out_path_needs_overwrite(source, tmp_path):
    model = tiny_llama(True)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="out_path.*overwrite=True"):
        export_gguf(out, model, model.params, None, None, source_gguf=source)
    assert out.read_bytes() == b"keep me"
    export_gguf(out, model, model.params, None, None, source_gguf=source, overwrite=True, context_length=4096)
    config = read_gguf_llama(out)[0]
    assert config.num_hidden_layers == 2 and config.max_position_embeddings == 4096
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temporary file left beside it


def test_refuses_a_non_llama_model(source, tmp_path):
    gpt2 = tf.FlaxGPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
    with pytest.raises(ValueError, match="model_type 'gpt2'.*only Llama"):
        export_gguf(tmp_path / "g.gguf", gpt2, gpt2.params, None, None, source_gguf=source)
    assert not (tmp_path / "g.gguf").exists()


def test_needs_a_tokenizer_source_and_leaves_nothing_on_error(source, tmp_path):
    model = tiny_llama(True)
    with pytest.raises(ValueError, match="source_gguf.*tokenizer"):
        export_gguf(tmp_path / "m.gguf", model, model.params, None, None)
    small = tiny_llama(True, vocab_size=64)
    with pytest.raises(ValueError, match="128 tokens.*vocab_size is 64"):  # fails inside the atomic write
        export_gguf(tmp_path / "m.gguf", small, small.params, None, None, source_gguf=source)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="dtype"):
        export_gguf(tmp_path / "m.gguf", model, model.params, None, None, source_gguf=source, dtype="q4")


def test_refuses_what_gguf_cannot_hold_faithfully(source, tmp_path):
    model = tiny_llama(True)
    wordpiece = tf.AutoTokenizer.from_pretrained(jlora.hf.minilm_path())
    with pytest.raises(ValueError, match="tokenizer: only byte-level BPE"):
        export_gguf(tmp_path / "m.gguf", model, model.params, None, None, tokenizer=wordpiece)
    flat = flatten(model.params)
    flat[("model", "layers", "0", "mlp", "up_proj", "kernel")] = flat[("model", "layers", "0", "mlp", "up_proj",
                                                                        "kernel")].at[0, 0].set(1e6)
    with pytest.raises(ValueError, match="up_proj/kernel overflows float16"):
        export_gguf(tmp_path / "m.gguf", model, unflatten(flat), None, None, source_gguf=source, dtype="f16")
    with pytest.raises(ValueError, match="lora and config"):
        export_gguf(tmp_path / "m.gguf", model, model.params, None, LORA_CONFIG, source_gguf=source)
    assert list(tmp_path.iterdir()) == []


def test_transformers_own_gguf_loader_agrees(adapted, source, tmp_path):
    """An independent reader: PyTorch transformers' GGUF loader (its own q/k un-permutation)."""
    import torch

    model, lora = adapted
    export_gguf(tmp_path / "m.gguf", model, model.params, lora, LORA_CONFIG, source_gguf=source)
    torch_model = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", torch_dtype=torch.float32)
    with torch.no_grad():
        got = torch_model.eval()(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
    expected = np.asarray(jlora.apply(model, LORA_CONFIG)(model.params, lora, IDS).logits)
    diff = np.abs(got - expected).max()
    print(f"PyTorch transformers from the GGUF, tied={model.config.tie_word_embeddings}: max |logit diff| {diff:.3g}")
    assert diff < 1e-5
