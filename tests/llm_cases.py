"""Shared by the causal-LM tests: a tiny random tied Llama with SmolLM2's real tokenizer (an HF folder
with PyTorch-named safetensors), the CLI flags of a tiny run, and the CLI runner."""
import pytest
import transformers as tf

import jlora
from jlora.hf.export import atomic_dir
from jlora.hf.llama import FlaxLlamaForCausalLMFixed, read_gguf_tokenizer
from jlora.hf.names import to_torch_state
from cli_runs import jlora_cli  # noqa: F401 (re-exported for the causal-LM tests)

TINY = ["--task", "causal-lm", "--batch", "2", "--max-length", "64", "--seq-len", "128", "--eval-examples", "4",
        "--gen-examples", "2", "--max-new-tokens", "4", "--no-progress", "--dtype", "float32"]  # exact comparisons


def tiny_llama_config(**overrides):
    settings = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=49152, max_position_embeddings=256, rope_theta=100000.0,
                    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    settings.update(overrides)
    return tf.LlamaConfig(**settings)


@pytest.fixture(scope="module")
def tokenizer():
    return read_gguf_tokenizer(jlora.hf.smollm2_gguf_path())


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer):
    """A random 2-layer tied Llama with SmolLM2's tokenizer, as an HF folder with PyTorch-named weights."""
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    config = tiny_llama_config()
    model = FlaxLlamaForCausalLMFixed(config, seed=0)
    with atomic_dir(folder) as tmp:
        from safetensors.numpy import save_file
        save_file(to_torch_state(model.params), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.to_json_file(str(tmp / "config.json"))
        tokenizer.save_pretrained(str(tmp))
    return folder


