"""The GPT-2 workloads (W1, W2, tiny) of compare_peft.py: jlora (Flax GPT-2) and PEFT (PyTorch GPT-2).

Both sides train the same random-init GPT-2 config (dropout off) with adamw on the next-token loss,
LoRA r=8, alpha=16 on ``c_attn`` (PEFT's setting: the whole fused q,k,v projection). On the jlora side
``loss="fused"`` (the default) computes that loss with :func:`jlora.lm_head_cross_entropy` from the
final hidden states and the tied embedding, so that the step holds one logits tensor instead of two
or three; ``loss="plain"`` is the textbook ``optax.softmax_cross_entropy_with_integer_labels(
logits[:, :-1], ids[:, 1:])``. PEFT computes transformers' own loss (``labels=ids``).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from timing import median_seconds, time_inference, time_train_step

RANK = 8


def gpt2_config(spec: dict, vocab: int) -> Any:
    import transformers as tf
    return tf.GPT2Config(n_layer=spec["n_layer"], n_embd=spec["n_embd"], n_head=spec["n_head"], vocab_size=vocab,
                         n_positions=max(256, spec["seq"]), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def lm_loss(logits: jax.Array, ids: jax.Array) -> jax.Array:
    """The plain next-token loss: mean cross-entropy of ``logits[:, :-1]`` against ``ids[:, 1:]``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def make_loss(loss: str, chunk_size: int = 1024) -> Any:
    """``loss_fn(outputs_of(**model_kwargs), params, ids)`` and the model kwargs it needs."""
    if loss == "plain":
        return (lambda out, params, ids: lm_loss(out.logits, ids)), {}
    if loss == "fused":
        def fused(out, params, ids):
            labels, weights = jlora.next_token_targets(ids)
            embedding = params["transformer"]["wte"]["embedding"]  # GPT-2 ties the head to the embedding
            return jlora.lm_head_cross_entropy(out.hidden_states[-1], embedding, labels, weights, transposed=True,
                                               chunk_size=chunk_size)
        return fused, {"output_hidden_states": True}
    raise ValueError(f"loss: expected 'fused' or 'plain', got {loss!r}")


def measure_jax(hf_config: Any, spec: dict, steps: int, shapes: tuple,
                variants: tuple[str, ...] = ("jlora_lora", "jlora_full"), loss: str = "fused",
                chunk_size: int = 1024) -> dict[str, Any]:
    """Compile, memory analysis, median step of the jlora LoRA and full steps; inference latency."""
    import transformers as tf
    model = tf.FlaxGPT2LMHeadModel(hf_config, seed=0)
    params = model.params
    config = jlora.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=("c_attn",), fan_in_fan_out=True)
    lora = jlora.init(jax.random.key(0), params, config)
    trainable, frozen = jlora.split(params, lora, config)
    f = jlora.apply(model, config)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, hf_config.vocab_size, (spec["batch"], spec["seq"])),
                      jnp.int32)
    tx_lora, tx_full = jlora.optimizer(optax.adamw(1e-4), config), optax.adamw(1e-4)
    loss_fn, model_kwargs = make_loss(loss, chunk_size)

    def lora_step(t, o, ids, fz):  # the frozen base is an argument: closed over, XLA bakes it in as constants
        loss, g = jax.value_and_grad(lambda t: loss_fn(f(fz, t, ids, **model_kwargs), fz, ids))(t)
        u, o = tx_lora.update(g, o, t)
        return optax.apply_updates(t, u), o, loss

    def full_step(p, o, ids, _):
        loss, g = jax.value_and_grad(lambda p: loss_fn(model(ids, params=p, **model_kwargs), p, ids))(p)
        u, o = tx_full.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    out: dict[str, Any] = {}
    if shapes:
        base_fwd = jax.jit(lambda p, x: model(x, params=p).logits)
        lora_fwd = jax.jit(lambda p, l, x: f(p, l, x).logits)
        nonzero = jax.tree_util.tree_map(lambda x: x + 0.01, lora)  # non-zero lora_b: a real unmerged path
        out["inference"] = time_inference(base_fwd, lora_fwd, params, nonzero, config, shapes, steps)
    for name, step, state, tx, rest in (("jlora_lora", lora_step, trainable, tx_lora, frozen),
                                        ("jlora_full", full_step, params, tx_full, {})):
        if name not in variants:
            continue
        out[name] = time_train_step(step, state, tx.init(state), ids, rest, steps)
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
    out["bytes"] = {"params": nbytes(params), "trainable": nbytes(trainable)}
    return out


def measure_torch(hf_config: Any, spec: dict, steps: int, threads: int,
                  variants: tuple[str, ...] = ("peft_lora", "torch_full")) -> dict[str, Any]:
    """Median step of PEFT LoRA and of a plain PyTorch full fine-tune on ``threads`` CPU threads."""
    import torch
    import transformers as tf
    from peft import LoraConfig as PeftConfig, get_peft_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    ids = torch.tensor(np.random.default_rng(0).integers(0, hf_config.vocab_size, (spec["batch"], spec["seq"])))
    out = {}
    for name in variants:
        model = tf.GPT2LMHeadModel(hf_config).train()
        if name == "peft_lora":
            model = get_peft_model(model, PeftConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["c_attn"],
                                                     fan_in_fan_out=True))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def run():
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return None
        first, median = median_seconds(run, steps)
        out[name] = {"first_step_s": first, "step_s": median,
                     "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    return out
