"""Adapter checkpoint bytes vs full-parameter bytes for GPT-2 configs (the paper: 350 GB -> 35 MB).

    python benchmarks/checkpoint_size.py [--rank 4] [--out benchmarks/results/checkpoint_size.json]

For each GPT-2 size (shapes only: no base weights are made), the paper's adapters (r on W_q, W_v:
the q and v slices of ``c_attn``) are created and written with orbax twice: the adapters alone
(what you ship) and a training checkpoint with adamw state (what ``AdapterCheckpointer`` writes).
Bytes on disk are measured; the full-parameter figure is the base's float32 bytes.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
import transformers as tf

import jlora

SIZES = {"gpt2 (124M)": dict(n_layer=12, n_embd=768, n_head=12), "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16),
         "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20), "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25)}


def noise(tree: Any) -> Any:
    """Random values in every float leaf (a fresh adapter's zeros would compress to nothing)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [
        jax.random.normal(k, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
        for k, x in zip(keys, leaves)])


def disk_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def measure(name: str, rank: int, work: Path) -> dict[str, float]:
    model = tf.FlaxGPT2LMHeadModel(tf.GPT2Config(**SIZES[name]), _do_init=False)
    shapes = model.params_shape_tree
    config = jlora.hf.default_config(model, r=rank, lora_alpha=2 * rank)
    lora = noise(jlora.init(jax.random.key(0), shapes, config))  # trained-like: no all-zero lora_b
    opt_state = noise(jlora.optimizer(optax.adamw(1e-4), config).init(lora))  # orbax compresses zeros
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(work / name / "adapters", lora)
        checkpointer.save(work / name / "training", {"trainable": lora, "opt_state": opt_state})
    counts = jlora.count(shapes, lora, config)
    return {"base_params": counts.base, "adapter_params": counts.adapter, "full_bytes": counts.base_bytes,
            "adapter_disk_bytes": disk_bytes(work / name / "adapters"),
            "training_disk_bytes": disk_bytes(work / name / "training")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/checkpoint_size.json"))
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in SIZES:
            results[name] = measure(name, args.rank, Path(tmp))
    print(f"| model | params | full fp32 | adapters (r={args.rank}) on disk | ratio | training ckpt (adapters+adamw) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['base_params'] / 1e6:.0f}M | {r['full_bytes'] / 2**20:.0f} MiB | "
              f"{r['adapter_disk_bytes'] / 2**20:.2f} MiB | {r['full_bytes'] / r['adapter_disk_bytes']:.0f}x | "
              f"{r['training_disk_bytes'] / 2**20:.2f} MiB |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rank": args.rank, "results": results}, indent=2))


if __name__ == "__main__":
    main()
