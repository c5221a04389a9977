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
from timing import compile_train_step, median_seconds, time_inference

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


def _train_steps(model: Any, f: Any, tx_lora: Any, tx_full: Any, loss: str, chunk_size: int) -> dict[str, Any]:
    """The jlora LoRA and full train steps ``step(state, opt_state, ids, rest) -> (state, opt_state, loss)``."""
    loss_fn, model_kwargs = make_loss(loss, chunk_size)

    def lora_step(t, o, ids, fz):  # the frozen base is an argument: closed over, XLA bakes it in as constants
        loss, g = jax.value_and_grad(lambda t: loss_fn(f(fz, t, ids, **model_kwargs), fz, ids))(t)
        u, o = tx_lora.update(g, o, t)
        return optax.apply_updates(t, u), o, loss

    def full_step(p, o, ids, _):
        loss, g = jax.value_and_grad(lambda p: loss_fn(model(ids, params=p, **model_kwargs), p, ids))(p)
        u, o = tx_full.update(g, o, p)
        return optax.apply_updates(p, u), o, loss
    return {"jlora_lora": lora_step, "jlora_full": full_step}


def build_jax(hf_config: Any, spec: dict, loss: str = "fused", chunk_size: int = 1024,
              dtype: str = "float32") -> dict[str, Any]:
    """The Flax GPT-2 (random init), its jlora LoRA setup, the batch, and the two train steps with
    their states: ``built["steps"][name] = (step, state, tx, rest)``. ``dtype``: the model's compute
    dtype; in bfloat16 the LoRA step's frozen base is also stored in bf16 (adapters, their Adam state
    and the full fine-tune's params stay float32: master weights), the same init either way."""
    import transformers as tf
    model = tf.FlaxGPT2LMHeadModel(hf_config, seed=0, dtype=jnp.dtype(dtype))
    params = model.params
    config = jlora.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=("c_attn",), fan_in_fan_out=True)
    lora = jlora.init(jax.random.key(0), params, config)
    trainable, frozen = jlora.split(params, lora, config)
    if dtype != "float32":
        frozen = jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                        frozen)
    f = jlora.apply(model, config)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, hf_config.vocab_size, (spec["batch"], spec["seq"])),
                      jnp.int32)
    tx_lora, tx_full = jlora.optimizer(optax.adamw(1e-4), config), optax.adamw(1e-4)
    steps = _train_steps(model, f, tx_lora, tx_full, loss, chunk_size)
    plain = _train_steps(model, f, tx_lora, tx_full, "plain", chunk_size)
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
    return {"model": model, "params": params, "config": config, "lora": lora, "f": f, "ids": ids,
            "steps": {"jlora_lora": (steps["jlora_lora"], trainable, tx_lora, frozen),
                      "jlora_full": (steps["jlora_full"], params, tx_full, {})},
            "plain_steps": plain, "bytes": {"params": nbytes(params), "trainable": nbytes(trainable)}}


def xla_flops(step: Any, state: Any, opt_state: Any, ids: Any, rest: Any) -> float | None:
    """XLA's cost-analysis FLOPs of ``step`` (lowered, not compiled)."""
    cost = jax.jit(step).lower(state, opt_state, ids, rest).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return None if not cost or "flops" not in cost else float(cost["flops"])


def prepare_jax(built: dict[str, Any], variants: tuple[str, ...] = ("jlora_lora", "jlora_full")) -> dict[str, Any]:
    """``{name: (run, info)}``: each step compiled (:func:`timing.compile_train_step`), ``run()`` one
    step; ``info``: compile seconds, XLA's memory analysis, and ``xla_flops_plain_loss``, XLA's count
    of the same step with the plain loss (the fused loss's backward is a ``scan`` over vocabulary
    blocks, whose body cost analysis counts once; both do the same matmuls)."""
    out = {}
    for name in variants:
        step, state, tx, rest = built["steps"][name]
        opt_state = tx.init(state)
        run, info = compile_train_step(step, state, opt_state, built["ids"], rest)
        info["xla_flops_plain_loss"] = xla_flops(built["plain_steps"][name], state, opt_state, built["ids"], rest)
        out[name] = (run, info)
    return out


def jax_inference(built: dict[str, Any], shapes: tuple, rounds: int) -> dict[str, Any]:
    """Inference latency (jit forward) of the base, merged and unmerged LoRA model (:func:`timing.time_inference`)."""
    model, f = built["model"], built["f"]
    base_fwd = jax.jit(lambda p, x: model(x, params=p).logits)
    lora_fwd = jax.jit(lambda p, l, x: f(p, l, x).logits)
    nonzero = jax.tree_util.tree_map(lambda x: x + 0.01, built["lora"])  # non-zero lora_b: a real unmerged path
    return time_inference(base_fwd, lora_fwd, built["params"], nonzero, built["config"], shapes, rounds)


def measure_jax(hf_config: Any, spec: dict, steps: int, shapes: tuple,
                variants: tuple[str, ...] = ("jlora_lora", "jlora_full"), loss: str = "fused",
                chunk_size: int = 1024) -> dict[str, Any]:
    """Each variant on its own (no alternation; compare_peft's ``--rss`` children): compile, memory
    analysis, median of ``steps`` steps; inference latency at ``shapes``."""
    built = build_jax(hf_config, spec, loss, chunk_size)
    out: dict[str, Any] = {}
    if shapes:
        out["inference"] = jax_inference(built, shapes, steps)
    for name, (run, info) in prepare_jax(built, variants).items():
        first, median = median_seconds(run, steps)
        out[name] = {**info, "first_step_s": first, "step_s": median}
    out["bytes"] = built["bytes"]
    return out


def attention_flops(spec: dict) -> float:
    """FLOPs of the attention matmuls of a train step, full ``s x s`` scores (causal mask applied, not
    skipped): forward ``Q K^T`` and ``P V`` (2 * 2 b s^2 d per layer), backward twice that."""
    return 3.0 * 4 * spec["batch"] * spec["seq"] ** 2 * spec["n_embd"] * spec["n_layer"]


def torch_flops(run: Any) -> tuple[float, set[str]]:
    """Run ``run()`` once under torch's ``FlopCounterMode``: ``(FLOPs counted, names of the counted ops)``."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return float(counter.get_total_flops()), {str(op) for ops in counter.get_flop_counts().values() for op in ops}


def prepare_torch(hf_config: Any, spec: dict, threads: int,
                  variants: tuple[str, ...] = ("peft_lora", "torch_full")) -> dict[str, Any]:
    """``{name: (run, info)}`` for PEFT LoRA and a plain PyTorch full fine-tune on ``threads`` CPU
    threads; ``info``: trainable parameters and the step's FLOPs as torch's ``FlopCounterMode``
    counts them (matmuls and attention, 2 per multiply-add; one step is run to count them)."""
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

        def run(model=model, opt=opt):
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return None
        counted, ops = torch_flops(run)
        # FlopCounterMode has no formula for SDPA's CPU kernel: add the attention matmuls by hand
        attention = 0.0 if any("attention" in op for op in ops) else attention_flops(spec)
        out[name] = (run, {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                           "torch_flops": counted, "attention_flops_added": attention,
                           "matmul_flops": counted + attention,
                           "attn_implementation": getattr(model.config, "_attn_implementation", None)})
    return out


def measure_torch(hf_config: Any, spec: dict, steps: int, threads: int,
                  variants: tuple[str, ...] = ("peft_lora", "torch_full")) -> dict[str, Any]:
    """Each variant on its own (no alternation; compare_peft's ``--rss`` children): median step."""
    out = {}
    for name, (run, info) in prepare_torch(hf_config, spec, threads, variants).items():
        first, median = median_seconds(run, steps)
        out[name] = {**info, "first_step_s": first, "step_s": median}
    return out
