"""Real shipped weights, no hub: MiniLM (PyTorch safetensors folder) and SmolLM2-135M (GGUF).

The PyTorch side is transformers' own loaders (safetensors folder; its own GGUF reader), so the
Flax weights jlora builds are checked against an independent reading of the same files.
"""
import json

import jax
import numpy as np
import pytest
import torch
import transformers as tf

import jlora
from jlora.hf.llama import load_gguf_llama, read_gguf_llama

PROMPT = np.array([[1, 504, 3458, 314, 4944, 314, 260, 1345, 30, 378, 4118, 28]], np.int32)


@pytest.fixture(scope="module")
def smollm2():
    return load_gguf_llama(jlora.hf.smollm2_gguf_path(), max_position_embeddings=128)


@pytest.fixture(scope="module")
def smollm2_torch(tmp_path_factory):
    folder = tmp_path_factory.mktemp("smollm2")
    (folder / "model.gguf").symlink_to(jlora.hf.smollm2_gguf_path())
    return tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf", torch_dtype=torch.float32).eval()


def test_minilm_loads_without_torch_and_matches_pytorch():
    path = jlora.hf.minilm_path()
    flax_model = tf.FlaxBertModel.from_pretrained(path, from_pt=True)
    torch_model = tf.BertModel.from_pretrained(path).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["LoRA freezes the pretrained weights.", "Low rank, high value."], padding=True,
                      return_tensors="np")
    hidden = np.asarray(flax_model(**batch).last_hidden_state)
    with torch.no_grad():
        expected = torch_model(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()
    assert np.abs(hidden - expected).max() < 1e-4


def test_smollm2_gguf_logits_and_greedy_tokens_match_pytorch(smollm2, smollm2_torch):
    model, params = smollm2
    assert model.config.rope_theta == 100000.0 and model.config.tie_word_embeddings
    assert "lm_head" not in params
    logits = np.asarray(model(PROMPT, params=params).logits)
    with torch.no_grad():
        expected = smollm2_torch(torch.tensor(PROMPT, dtype=torch.long)).logits.numpy()
    max_diff = np.abs(logits - expected).max()
    print(f"SmolLM2 GGUF: max |logit diff| vs PyTorch transformers = {max_diff:.3g} (logits up to "
          f"{np.abs(expected).max():.1f})")
    assert max_diff < 1e-3
    ours = np.asarray(model.generate(PROMPT, params=params, max_new_tokens=10, do_sample=False).sequences)
    theirs = smollm2_torch.generate(torch.tensor(PROMPT, dtype=torch.long), max_new_tokens=10, do_sample=False,
                                    attention_mask=torch.ones(PROMPT.shape, dtype=torch.long)).numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_plain_flax_llama_gets_smollm2_wrong_without_the_fixes(smollm2, smollm2_torch):
    model, params = smollm2
    plain = tf.FlaxLlamaForCausalLM(model.config, _do_init=False)
    tied = {**params, "lm_head": {"kernel": params["model"]["embed_tokens"]["embedding"].T}}
    logits = np.asarray(plain(PROMPT, params=tied).logits)  # rope_theta ignored: 10000 instead of 1e5
    with torch.no_grad():
        expected = smollm2_torch(torch.tensor(PROMPT, dtype=torch.long)).logits.numpy()
    assert np.abs(logits - expected).max() > 0.1


def test_gguf_reader_rejects_other_architectures(tmp_path):
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "falcon")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"general.architecture is 'falcon'; only 'llama'"):
        read_gguf_llama(tmp_path / "x.gguf")


def test_lora_on_smollm2_then_export_loads_in_pytorch(smollm2, tmp_path):
    model, params = smollm2
    config = jlora.hf.default_config(model, r=2)
    lora = jlora.init(jax.random.key(0), params, config)
    lora = jax.tree_util.tree_map(lambda x: x + 0.01, lora)
    adapted = np.asarray(jlora.apply(model, config)(params, lora, PROMPT).logits)
    out = jlora.hf.export_merged(tmp_path / "merged", model, params, lora, config)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    torch_model, info = tf.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        expected = torch_model.eval()(torch.tensor(PROMPT, dtype=torch.long)).logits.numpy()
    assert np.abs(adapted - expected).max() < 1e-3


def test_gguf_tokenizer_matches_transformers_reading_of_the_same_file(smollm2_torch, tmp_path):
    from jlora.app.data import shakespeare_text
    from jlora.hf.llama import read_gguf_tokenizer

    ours = read_gguf_tokenizer(jlora.hf.smollm2_gguf_path())
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "model.gguf").symlink_to(jlora.hf.smollm2_gguf_path())
    theirs = tf.AutoTokenizer.from_pretrained(folder, gguf_file="model.gguf")
    text = shakespeare_text("hamlet")[:20000] + " 12345 <|im_start|>user\nhi<|im_end|>"
    a, b = ours(text)["input_ids"], theirs(text)["input_ids"]
    assert b[0] == theirs.bos_token_id and a == b[1:]  # transformers' GGUF conversion prepends BOS; SmolLM2 does not
    assert ours.decode(a) == text
    assert (ours.eos_token, ours.pad_token) == ("<|im_end|>", "<|im_end|>")
