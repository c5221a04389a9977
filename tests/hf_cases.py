"""Tiny random-init configs of every transformers family jlora supports (no hub access)."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import transformers as tf

SMALL = dict(vocab_size=96, max_position_embeddings=64)
DECODER = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=64, **SMALL)
ENCODER = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
               num_labels=3, **SMALL)


@dataclasses.dataclass
class Case:
    name: str
    config: Any
    flax_cls: Any
    torch_name: str
    task: str  # "lm", "cls" or "seq2seq"

    def model(self, seed: int = 0):
        return self.flax_cls(self.config, seed=seed)

    def torch_cls(self):
        return getattr(tf, self.torch_name)

    def inputs(self, batch: int = 2, length: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        ids = rng.integers(3, 90, (batch, length)).astype(np.int32)
        out = {"input_ids": ids}
        if self.task == "seq2seq":
            out["decoder_input_ids"] = rng.integers(3, 90, (batch, length)).astype(np.int32)
        return out


CASES = {
    "gpt2": Case("gpt2", tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=96, n_positions=64),
                 tf.FlaxGPT2LMHeadModel, "GPT2LMHeadModel", "lm"),
    "bert": Case("bert", tf.BertConfig(**ENCODER), tf.FlaxBertForSequenceClassification,
                 "BertForSequenceClassification", "cls"),
    "roberta": Case("roberta", tf.RobertaConfig(**ENCODER), tf.FlaxRobertaForSequenceClassification,
                    "RobertaForSequenceClassification", "cls"),
    "llama": Case("llama", tf.LlamaConfig(**DECODER), tf.FlaxLlamaForCausalLM, "LlamaForCausalLM", "lm"),
    # FlaxMistral masks everything but the diagonal when sliding_window is None: give it one.
    "mistral": Case("mistral", tf.MistralConfig(sliding_window=64, **DECODER), tf.FlaxMistralForCausalLM,
                    "MistralForCausalLM", "lm"),
    "gemma": Case("gemma", tf.GemmaConfig(head_dim=8, hidden_activation="gelu_pytorch_tanh", **DECODER),
                  tf.FlaxGemmaForCausalLM, "GemmaForCausalLM", "lm"),
    "t5": Case("t5", tf.T5Config(num_layers=2, d_model=32, d_kv=8, num_heads=4, d_ff=64, vocab_size=96),
               tf.FlaxT5ForConditionalGeneration, "T5ForConditionalGeneration", "seq2seq"),
}
