"""XLA's compiled memory of a LoRA train step vs a full fine-tune train step (compile only, nothing runs).

    python benchmarks/compiled_memory.py --model big-kernel   # one 4096x4096 Dense (LoRA r=8) + small head
    python benchmarks/compiled_memory.py --model gpt-small    # 4-layer GPT-like decoder, LoRA r=8 on query/value

Both steps are ``jax.jit`` (adamw, ``value_and_grad`` + update, state donated) lowered on
``jax.ShapeDtypeStruct`` trees and compiled; ``compiled.memory_analysis()`` gives argument, output,
alias (donated buffers reused for outputs), temp and generated-code bytes; ``live`` is
argument + output - alias + temp, the bytes the step holds at once. The theoretical figures
count only the training state: full = params + grads + 2 Adam moments (4 x params); LoRA = frozen
params + trainable (adapters + ``modules_to_save``) x 4 (weights, grads, 2 moments).
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from memory_theory import live_bytes, state_bytes

FIELDS = ("argument", "output", "alias", "temp", "generated_code")
D, HEADS, LAYERS, VOCAB, SEQ, BATCH = 256, 4, 4, 50257, 128, 8


class BigKernel(nn.Module):
    """One 4096x4096 Dense and a 10-way head."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(10, name="head")(nn.relu(nn.Dense(4096, name="big")(x)))


class GPTBlock(nn.Module):
    """Pre-LN causal self-attention (query/key/value/out) and a 4x MLP."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, seq, _ = x.shape
        h = nn.LayerNorm(name="ln_1")(x)
        q, k, v = (nn.Dense(D, name=n)(h).reshape(batch, seq, HEADS, D // HEADS) for n in ("query", "key", "value"))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D // HEADS)
        scores = jnp.where(jnp.tril(jnp.ones((seq, seq), bool)), scores, jnp.finfo(scores.dtype).min)
        attended = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(batch, seq, D)
        x = x + nn.Dense(D, name="out")(attended)
        h = nn.LayerNorm(name="ln_2")(x)
        return x + nn.Dense(D, name="mlp_proj")(nn.gelu(nn.Dense(4 * D, name="mlp_fc")(h)))


class GPTSmall(nn.Module):
    """GPT-2-like decoder with tied input/output embeddings."""

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        wte = nn.Embed(VOCAB, D, name="wte")
        x = wte(tokens) + self.param("wpe", nn.initializers.normal(0.02), (SEQ, D))[: tokens.shape[1]]
        for i in range(LAYERS):
            x = GPTBlock(name=f"h_{i}")(x)
        return wte.attend(nn.LayerNorm(name="ln_f")(x))


def setup(name: str) -> tuple[nn.Module, jlora.LoraConfig, jax.ShapeDtypeStruct, jax.ShapeDtypeStruct,
                              Callable[[jax.Array, jax.Array], jax.Array]]:
    """Model, LoRA config, input and label specs, and ``loss(logits, labels)`` of a benchmark model."""
    if name == "big-kernel":
        config = jlora.LoraConfig(r=8, lora_alpha=16, target_modules=("big",), modules_to_save=("head",))
        x, y = jax.ShapeDtypeStruct((64, 4096), jnp.float32), jax.ShapeDtypeStruct((64,), jnp.int32)
        return BigKernel(), config, x, y, lambda logits, labels: \
            optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    config = jlora.LoraConfig(r=8, lora_alpha=16, target_modules=("query", "value"))
    tokens = jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32)
    return GPTSmall(), config, tokens, tokens, lambda logits, labels: \
        optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], labels[:, 1:]).mean()


def nbytes(tree: Any) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def compile_step(loss_of: Callable[[Any, jax.Array, jax.Array], jax.Array], tx: optax.GradientTransformation,
                 state: Any, *extra: Any) -> dict[str, int]:
    """Compile ``(state, opt_state, *extra) -> (state, opt_state, loss)`` with the two first donated."""
    def step(state: Any, opt_state: Any, *extra: Any) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_of)(state, *extra)
        updates, opt_state = tx.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss

    opt_state = jax.eval_shape(tx.init, state)
    stats = jax.jit(step, donate_argnums=(0, 1)).lower(state, opt_state, *extra).compile().memory_analysis()
    result = {field: int(getattr(stats, f"{field}_size_in_bytes")) for field in FIELDS}
    result["live"] = live_bytes(result)
    return result


def measure(name: str) -> dict[str, Any]:
    """Compiled and theoretical bytes of the LoRA and the full fine-tune step of model ``name``."""
    model, config, x, y, loss = setup(name)
    key = jax.random.key(0)
    variables = jax.eval_shape(model.init, key, x)
    lora = jax.eval_shape(lambda v: jlora.init(key, v, config), variables)
    trainable, frozen = jlora.split(variables, lora, config)
    f = jlora.apply(model.apply, config)
    lora_bytes = compile_step(lambda t, fr, xb, yb: loss(f(fr, t, xb), yb),
                              jlora.optimizer(optax.adamw(1e-3), config), trainable, frozen, x, y)
    full_bytes = compile_step(lambda p, xb, yb: loss(model.apply(p, xb), yb), optax.adamw(1e-3), variables, x, y)
    params, train = nbytes(variables), nbytes(trainable)
    lora_bytes["theoretical"] = state_bytes(nbytes(frozen), train)["lora"]
    full_bytes["theoretical"] = state_bytes(params, train)["full"]
    return {"model": name, "backend": jax.default_backend(), "jax": jax.__version__,
            "count": str(jlora.count(variables, lora, config)),
            "params_bytes": params, "trainable_bytes": train, "frozen_bytes": nbytes(frozen),
            "lora": lora_bytes, "full": full_bytes,
            "ratio": {k: lora_bytes[k] / full_bytes[k] if full_bytes[k] else None for k in lora_bytes}}


def table(result: dict[str, Any]) -> str:
    """Markdown table of the LoRA and full figures side by side, in MiB, with LoRA/full ratios."""
    mib = lambda n: f"{n / 2**20:,.2f}"  # noqa: E731
    rows = ["| bytes (MiB) | LoRA | full | LoRA/full |", "| --- | ---: | ---: | ---: |"]
    for key in (*FIELDS, "live", "theoretical"):
        ratio = result["ratio"][key]
        rows.append(f"| {key} | {mib(result['lora'][key])} | {mib(result['full'][key])} | "
                    f"{'n/a' if ratio is None else f'{ratio:.4f}'} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("big-kernel", "gpt-small"), default="big-kernel")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="JSON path (default benchmarks/results/compiled_memory_<model>.json)")
    args = parser.parse_args()
    out = args.out or pathlib.Path("benchmarks/results") / f"compiled_memory_{args.model}.json"
    result = measure(args.model)
    print(f"{args.model} on {result['backend']} (jax {result['jax']}): {result['count']}")
    print(f"params {result['params_bytes'] / 2**20:,.2f} MiB, "
          f"trainable {result['trainable_bytes'] / 2**20:,.3f} MiB")
    print(table(result))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
