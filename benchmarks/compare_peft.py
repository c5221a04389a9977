"""jlora vs PEFT (PyTorch) and vs full fine-tuning, on the same GPT-2 workload, in one process.

    python benchmarks/compare_peft.py [--workload W1|W2|tiny] [--steps 10] [--threads 2] [--out DIR]

W1: GPT-2 config, 4 layers, d=256, 4 heads, vocab 50257, batch 8x128, LoRA r=8 on c_attn (PEFT's
setting: the whole fused q,k,v projection); W2: GPT-2 small (124M). Random init, dropout off,
adamw, next-token loss. Reports, side by side:

* train-step time: median of ``--steps`` steps after warm-up (compile / first-call time apart),
  for jlora LoRA, jlora full, PEFT LoRA, PyTorch full; ratios jlora-LoRA/PEFT-LoRA and
  jlora-LoRA/jlora-full;
* XLA's compiled memory analysis of the jlora LoRA and full steps, beside the theoretical
  parameter + gradient + Adam-moment bytes;
* inference latency (jit forward) at batch 1 x 128 and 16 x 256: base, merged, unmerged LoRA;
* adapter vs full checkpoint bytes;
* with ``--rss``, the peak RSS of each variant run alone in a child process of its own (RSS is per
  process, so it cannot be told apart inside the one timing process).

The table is printed and written to ``<out>/compare_peft_<workload>.json``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora

WORKLOADS = {"W1": dict(n_layer=4, n_embd=256, n_head=4, batch=8, seq=128),
             "W2": dict(n_layer=12, n_embd=768, n_head=12, batch=8, seq=128),
             "tiny": dict(n_layer=2, n_embd=64, n_head=2, batch=2, seq=32)}
INFERENCE_SHAPES = {"W1": ((1, 128), (16, 256)), "W2": ((1, 128), (16, 256)), "tiny": ((1, 32), (2, 64))}
RANK = 8


def median_seconds(run: Callable[[], Any], steps: int, warmup: int = 2) -> tuple[float, float]:
    """(first call incl. compile, median of ``steps`` calls after ``warmup``)."""
    start = time.perf_counter()
    jax.block_until_ready(run())
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        jax.block_until_ready(run())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def gpt2_config(spec: dict, vocab: int) -> Any:
    import transformers as tf
    return tf.GPT2Config(n_layer=spec["n_layer"], n_embd=spec["n_embd"], n_head=spec["n_head"], vocab_size=vocab,
                         n_positions=max(256, spec["seq"]), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def lm_loss(logits: jax.Array, ids: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def measure_jax(hf_config: Any, spec: dict, steps: int, shapes: tuple,
                variants: tuple[str, ...] = ("jlora_lora", "jlora_full")) -> dict[str, Any]:
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

    def lora_step(t, o, ids, fz):  # the frozen base is an argument: closed over, XLA bakes it in as constants
        loss, g = jax.value_and_grad(lambda t: lm_loss(f(fz, t, ids).logits, ids))(t)
        u, o = tx_lora.update(g, o, t)
        return optax.apply_updates(t, u), o, loss

    def full_step(p, o, ids, _):
        loss, g = jax.value_and_grad(lambda p: lm_loss(model(ids, params=p).logits, ids))(p)
        u, o = tx_full.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    out: dict[str, Any] = {}
    for name, step, state, tx, rest in (("jlora_lora", lora_step, trainable, tx_lora, frozen),
                                        ("jlora_full", full_step, params, tx_full, {})):
        if name not in variants:
            continue
        opt_state = tx.init(state)
        start = time.perf_counter()
        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(state, opt_state, ids, rest).compile()
        compile_s = time.perf_counter() - start
        mem = compiled.memory_analysis()
        box = {"state": jax.tree_util.tree_map(jnp.copy, state), "opt": opt_state}

        def run():
            box["state"], box["opt"], loss = compiled(box["state"], box["opt"], ids, rest)
            return loss
        first, median = median_seconds(run, steps)
        out[name] = {"compile_s": compile_s, "first_step_s": first, "step_s": median,
                     "memory": {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in
                                ("argument", "output", "alias", "temp")}}
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
    out["bytes"] = {"params": nbytes(params), "trainable": nbytes(trainable)}
    if not shapes:
        return out
    lora = jax.tree_util.tree_map(lambda x: x + 0.01, lora)
    merged = jlora.merge(params, lora, config)
    base_fwd = jax.jit(lambda p, x: model(x, params=p).logits)
    lora_fwd = jax.jit(lambda p, l, x: f(p, l, x).logits)
    out["inference"] = {}
    for batch, seq in shapes:
        x = jnp.ones((batch, seq), jnp.int32)
        out["inference"][f"{batch}x{seq}"] = {
            "base_s": median_seconds(lambda: base_fwd(params, x), steps)[1],
            "merged_s": median_seconds(lambda: base_fwd(merged, x), steps)[1],
            "unmerged_s": median_seconds(lambda: lora_fwd(params, lora, x), steps)[1]}
    return out


def measure_torch(hf_config: Any, spec: dict, steps: int, threads: int,
                  variants: tuple[str, ...] = ("peft_lora", "torch_full")) -> dict[str, Any]:
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


VARIANTS = ("jlora_lora", "jlora_full", "peft_lora", "torch_full")


def peak_rss_mib() -> float:
    """VmHWM of this process: unlike getrusage's ru_maxrss, it is not inherited from the parent
    across fork + exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def measure_rss(args: argparse.Namespace) -> dict[str, float]:
    """Peak RSS of each variant in a process of its own (plus "none": the imports alone)."""
    import subprocess
    import sys
    rss = {}
    for variant in ("none", *VARIANTS):
        done = subprocess.run([sys.executable, __file__, "--workload", args.workload, "--vocab", str(args.vocab),
                               "--threads", str(args.threads), "--steps", "3", "--only", variant],
                              capture_output=True, text=True, check=True)
        rss[variant] = json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mib"]
    return rss


def run_only(args: argparse.Namespace, spec: dict, hf_config: Any) -> None:
    """Child mode of ``--rss``: run one variant's steps and print its peak RSS as JSON."""
    if args.only in ("jlora_lora", "jlora_full"):
        measure_jax(hf_config, spec, args.steps, (), variants=(args.only,))
    elif args.only in ("peft_lora", "torch_full"):
        measure_torch(hf_config, spec, args.steps, args.threads, variants=(args.only,))
    print(json.dumps({"variant": args.only, "peak_rss_mib": peak_rss_mib()}))


def theoretical(result: dict) -> dict[str, int]:
    """Parameter + gradient + two Adam moments of what trains (activations not included)."""
    params, trainable = result["bytes"]["params"], result["bytes"]["trainable"]
    return {"lora": params + 3 * trainable, "full": 4 * params}


def table(workload: str, jax_result: dict, torch_result: dict, threads: int, rss: dict | None = None) -> str:
    j_lora, j_full = jax_result["jlora_lora"], jax_result["jlora_full"]
    p_lora, t_full = torch_result["peft_lora"], torch_result["torch_full"]
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    live = lambda m: m["argument"] + m["output"] - m["alias"] + m["temp"]  # noqa: E731
    theory = theoretical(jax_result)
    lines = [f"workload {workload}: {WORKLOADS[workload]}, r={RANK} on c_attn, {threads} threads, "
             f"{platform.processor() or platform.machine()}, jax {jax.__version__}",
             "| train step | jlora LoRA | jlora full | PEFT LoRA | torch full |", "| --- | --- | --- | --- | --- |",
             f"| median step (s) | {j_lora['step_s']:.3f} | {j_full['step_s']:.3f} | {p_lora['step_s']:.3f} | "
             f"{t_full['step_s']:.3f} |",
             f"| compile / first step (s) | {j_lora['compile_s']:.1f} | {j_full['compile_s']:.1f} | "
             f"{p_lora['first_step_s']:.2f} | {t_full['first_step_s']:.2f} |",
             f"| XLA live bytes (MiB) | {mib(live(j_lora['memory']))} | {mib(live(j_full['memory']))} | | |",
             f"| XLA temp bytes (MiB) | {mib(j_lora['memory']['temp'])} | {mib(j_full['memory']['temp'])} | | |",
             f"| theoretical params+grads+adam (MiB) | {mib(theory['lora'])} | {mib(theory['full'])} | | |",
             "",
             f"ratios: jlora-LoRA / PEFT-LoRA = {j_lora['step_s'] / p_lora['step_s']:.2f}; "
             f"jlora-LoRA / jlora-full = {j_lora['step_s'] / j_full['step_s']:.2f}; "
             f"PEFT-LoRA / torch-full = {p_lora['step_s'] / t_full['step_s']:.2f}",
             "", "| inference (jit forward, s) | base | merged | unmerged LoRA | unmerged / base |",
             "| --- | --- | --- | --- | --- |"]
    for shape, r in jax_result["inference"].items():
        lines.append(f"| {shape} | {r['base_s']:.4f} | {r['merged_s']:.4f} | {r['unmerged_s']:.4f} | "
                     f"{r['unmerged_s'] / r['base_s']:.3f} |")
    if rss:
        lines += ["", "| peak RSS, own process (MiB) | imports only | jlora LoRA | jlora full | "
                  "PEFT LoRA | torch full |", "| --- | --- | --- | --- | --- | --- |",
                  "| | " + " | ".join(f"{rss[v]:.0f}" for v in ("none", *VARIANTS)) + " |"]
    b = jax_result["bytes"]
    lines += ["", f"checkpoint bytes: adapters {b['trainable']:,} vs full {b['params']:,} "
              f"({b['params'] / b['trainable']:.0f}x smaller)"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="W1")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--rss", action="store_true", help="also peak RSS of each variant in its own process")
    parser.add_argument("--only", choices=("none", *VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    spec = WORKLOADS[args.workload]
    hf_config = gpt2_config(spec, args.vocab)
    if args.only:
        return run_only(args, spec, hf_config)
    jax_result = measure_jax(hf_config, spec, args.steps, INFERENCE_SHAPES[args.workload])
    torch_result = measure_torch(hf_config, spec, args.steps, args.threads)
    rss = measure_rss(args) if args.rss else None
    report = table(args.workload, jax_result, torch_result, args.threads, rss)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"compare_peft_{args.workload}.json").write_text(json.dumps(
        {"workload": args.workload, "spec": spec, "jax": jax_result, "torch": torch_result, "peak_rss_mib": rss,
         "table": report},
        indent=2))


if __name__ == "__main__":
    main()
