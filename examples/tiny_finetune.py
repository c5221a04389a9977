"""LoRA fine-tune of a tiny linen transformer on a synthetic task, end to end in under a minute on CPU.

    python examples/tiny_finetune.py [--steps 300] [--rank 4] [--seed 0] [--out runs/tiny]

1. Data: random token sequences; task 1 labels a sequence by whether token 1 occurs more often
   than token 2, task 2 by whether token 3 occurs more often than token 4 (ties are resampled).
2. "Pretrain": full fine-tuning of the whole model on task 1.
3. LoRA: adapters of rank ``--rank`` on every ``query``/``value`` projection plus a fully trained
   ``classifier`` head (``modules_to_save``) on task 2, with ``jax.grad`` w.r.t. the trainable
   tree only; the frozen tree is checked bit-identical afterwards.
4. Merge the adapters into the kernels and check the merged model's logits against the adapted one.
Metrics go to ``<out>/metrics.json``.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

import jlora

VOCAB, SEQ, D_MODEL, HEADS, D_MLP, LAYERS = 16, 24, 64, 4, 128, 2
TASK1, TASK2 = (1, 2), (3, 4)  # (token A, token B): label = count(A) > count(B)
N_TRAIN, N_EVAL, BATCH = 4096, 1024, 64
PRETRAIN_STEPS, PRINT_EVERY = 300, 50


class Block(nn.Module):
    """Pre-LN transformer block: self-attention (query/key/value/out) then an MLP."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, seq, _ = x.shape
        h = nn.LayerNorm(name="ln_attn")(x)
        split = lambda t: t.reshape(batch, seq, HEADS, D_MODEL // HEADS)  # noqa: E731
        q, k, v = (split(nn.Dense(D_MODEL, name=n)(h)) for n in ("query", "key", "value"))
        weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D_MODEL // HEADS), axis=-1)
        attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, seq, D_MODEL)
        x = x + nn.Dense(D_MODEL, name="out")(attended)
        h = nn.LayerNorm(name="ln_mlp")(x)
        return x + nn.Dense(D_MODEL, name="mlp_out")(nn.gelu(nn.Dense(D_MLP, name="mlp_in")(h)))


class TinyClassifier(nn.Module):
    """Token + position embeddings, ``LAYERS`` blocks, final LayerNorm, mean pool, 2-way head."""

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = nn.Embed(VOCAB, D_MODEL, name="embed")(tokens)
        x = x + self.param("pos", nn.initializers.normal(0.02), (SEQ, D_MODEL))
        for i in range(LAYERS):
            x = Block(name=f"block_{i}")(x)
        return nn.Dense(2, name="classifier")(nn.LayerNorm(name="ln_f")(x).mean(axis=1))


def make_task(rng: np.random.Generator, tokens: tuple[int, int], n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` sequences with label ``count(A) > count(B)``; sequences with a tie are redrawn."""
    x = rng.integers(0, VOCAB, (n, SEQ), dtype=np.int32)
    diff = (x == tokens[0]).sum(1) - (x == tokens[1]).sum(1)
    while (ties := diff == 0).any():
        x[ties] = rng.integers(0, VOCAB, (int(ties.sum()), SEQ), dtype=np.int32)
        diff = (x == tokens[0]).sum(1) - (x == tokens[1]).sum(1)
    return x, (diff > 0).astype(np.int32)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def batches(rng: np.random.Generator, x: np.ndarray, y: np.ndarray,
            steps: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``steps`` random mini-batches of ``BATCH`` examples."""
    for _ in range(steps):
        idx = rng.integers(0, len(x), BATCH)
        yield x[idx], y[idx]


def accuracy(logits_fn: Callable[[np.ndarray], jax.Array], x: np.ndarray, y: np.ndarray) -> float:
    return float((np.asarray(logits_fn(x)).argmax(-1) == y).mean())


def pretrain(model: nn.Module, variables: dict, data: tuple, rng: np.random.Generator) -> dict:
    """Full fine-tuning of every parameter on task 1 (the "pretrained" base)."""
    tx = optax.adamw(3e-3)

    @jax.jit
    def step(params: dict, opt_state: Any, x: jax.Array, y: jax.Array) -> tuple[dict, Any, jax.Array]:
        loss, grads = jax.value_and_grad(lambda p: cross_entropy(model.apply(p, x), y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(variables)
    for x, y in batches(rng, *data, PRETRAIN_STEPS):
        variables, opt_state, _ = step(variables, opt_state, x, y)
    return variables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="LoRA fine-tuning steps on task 2")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank r")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/tiny"))
    args = parser.parse_args()
    if args.steps < 1 or args.rank < 1:
        parser.error("--steps and --rank must be at least 1")
    start = time.perf_counter()
    np_rng, key = np.random.default_rng(args.seed), jax.random.key(args.seed)
    task1_train, task1_eval = make_task(np_rng, TASK1, N_TRAIN), make_task(np_rng, TASK1, N_EVAL)
    task2_train, task2_eval = make_task(np_rng, TASK2, N_TRAIN), make_task(np_rng, TASK2, N_EVAL)

    model = TinyClassifier()
    variables = model.init(jax.random.fold_in(key, 0), task1_train[0][:1])
    variables = pretrain(model, variables, task1_train, np_rng)
    base_logits = jax.jit(lambda x: model.apply(variables, x))
    pretrained_task1 = accuracy(base_logits, *task1_eval)
    base_task2 = accuracy(base_logits, *task2_eval)
    print(f"pretrained base (full fine-tune, {PRETRAIN_STEPS} steps on task 1): "
          f"task-1 eval_accuracy={pretrained_task1:.4f}, task-2 eval_accuracy={base_task2:.4f}")

    config = jlora.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=("query", "value"),
                              modules_to_save=("classifier",))
    lora = jlora.init(jax.random.fold_in(key, 1), variables, config)
    counts = jlora.count(variables, lora, config)
    print(counts)
    f = jlora.apply(model.apply, config)
    trainable, frozen = jlora.split(variables, lora, config)
    frozen_before = jax.tree.map(np.array, frozen)
    tx = jlora.optimizer(optax.adamw(1e-2), config)
    opt_state = tx.init(trainable)

    @jax.jit
    def step(trainable: dict, opt_state: Any, frozen: dict, x: jax.Array,
             y: jax.Array) -> tuple[dict, Any, jax.Array]:
        loss, grads = jax.value_and_grad(lambda t: cross_entropy(f(frozen, t, x), y))(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    adapted_logits = jax.jit(lambda t, x: f(frozen, t, x))
    for i, (x, y) in enumerate(batches(np_rng, *task2_train, args.steps), start=1):
        trainable, opt_state, loss = step(trainable, opt_state, frozen, x, y)
        if i % PRINT_EVERY == 0 or i == args.steps:
            acc = accuracy(lambda x: adapted_logits(trainable, x), *task2_eval)
            print(f"step {i:4d}/{args.steps}  loss={float(loss):.4f}  eval_accuracy={acc:.4f}", flush=True)
    lora_task2 = accuracy(lambda x: adapted_logits(trainable, x), *task2_eval)

    assert jax.tree.all(jax.tree.map(np.array_equal, frozen_before, jax.tree.map(np.asarray, frozen))), \
        "the frozen tree changed during training"
    merged = jlora.merge(variables, trainable, config)
    x_eval = task2_eval[0]
    merge_diff = float(jnp.abs(model.apply(merged, x_eval) - adapted_logits(trainable, x_eval)).max())
    print(f"frozen tree bit-identical after training: True; merged vs adapted logits max abs diff: {merge_diff:.3e}")
    assert merge_diff < 1e-4, f"merged model disagrees with the adapted model by {merge_diff}"
    base_flat = traverse_util.flatten_dict(variables)
    changed = sorted({"/".join(path[1:-1]) for path, leaf in traverse_util.flatten_dict(merged).items()
                      if not np.array_equal(leaf, base_flat[path])})
    print(f"modules the merged model changed: {changed}")
    assert all(m == "classifier" or config.is_target(m) for m in changed), changed

    seconds = time.perf_counter() - start
    metrics = {
        "steps": args.steps, "rank": args.rank, "seed": args.seed, "pretrain_steps": PRETRAIN_STEPS,
        "pretrained_task1_accuracy": pretrained_task1, "base_task2_accuracy": base_task2,
        "eval_accuracy": lora_task2, "final_loss": float(loss), "merge_max_abs_diff": merge_diff,
        "trainable_params": counts.trainable, "adapter_params": counts.adapter, "base_params": counts.base,
        "checkpoint_bytes": counts.checkpoint_bytes, "seconds": round(seconds, 2),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"final: eval_accuracy={lora_task2:.4f} (base {base_task2:.4f}) trainable={counts.trainable:,}/"
          f"{counts.base:,} merge_diff={merge_diff:.1e} time={seconds:.1f}s metrics={args.out / 'metrics.json'}")


if __name__ == "__main__":
    main()
