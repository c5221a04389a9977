"""Trainable-parameter counts of the LoRA paper's settings, from configs (shapes only, no weights).

    python examples/paper_counts.py

GPT-2 Medium and Large with r=4 on W_q, W_v (the q and v slices of GPT-2's fused c_attn) and
RoBERTa-base with r=8 on W_q, W_v, counted with ``jlora.count`` on ``jax.eval_shape`` trees, beside
the numbers in Hu et al. 2021 (Tables 2 and 3).
"""
from __future__ import annotations

import jax
import transformers as tf

import jlora

SETTINGS = {
    # name: (config, Flax class, rank, the paper's trainable count)
    "GPT-2 Medium": (tf.GPT2Config(n_layer=24, n_embd=1024, n_head=16), tf.FlaxGPT2LMHeadModel, 4, "0.35M"),
    "GPT-2 Large": (tf.GPT2Config(n_layer=36, n_embd=1280, n_head=20), tf.FlaxGPT2LMHeadModel, 4, "0.77M"),
    "RoBERTa-base": (tf.RobertaConfig(), tf.FlaxRobertaModel, 8, "0.3M"),
}


def count_setting(config: tf.PretrainedConfig, flax_cls: type, rank: int) -> jlora.LoraCount:
    """``jlora.count`` for the paper's W_q, W_v adapters of rank ``rank`` (shapes only)."""
    model = flax_cls(config, _do_init=False)
    shapes = model.params_shape_tree
    lora_config = jlora.hf.default_config(model, r=rank, lora_alpha=rank)
    lora = jax.eval_shape(lambda p: jlora.init(jax.random.key(0), p, lora_config), shapes)
    return jlora.count(shapes, lora, lora_config)


def main() -> None:
    print("| model | r | base params | LoRA trainable (jlora) | paper | adapter checkpoint |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (config, flax_cls, rank, paper) in SETTINGS.items():
        counts = count_setting(config, flax_cls, rank)
        print(f"| {name} | {rank} | {counts.base / 1e6:.2f}M | {counts.trainable / 1e6:.3f}M ({counts.trainable:,}) "
              f"| {paper} | {counts.checkpoint_bytes / 2**20:.2f} MiB vs {counts.base_bytes / 2**20:.0f} MiB |")


if __name__ == "__main__":
    main()
