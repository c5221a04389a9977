"""QLoRA (issue 13): base bytes, compiled memory, jlora against qwix, perplexity of the quantized base.

    python benchmarks/qlora.py [--part bytes,memory,qwix,perplexity] [--shapes 4x512,1x512,1x128]
                               [--dtypes bfloat16,float32] [--scan-shapes 4x2048,1x2048] [--rounds 5] [--steps 2]
                               [--eval-examples 64]
                               [--out benchmarks/results/issue13]

Parts (each selectable; a run merges its parts into ``<out>/qlora.json`` and prints every part recorded):

- ``bytes``: bytes of ``jlora.quantize(params, fmt)`` (NF4, int8; scales included) against the same
  params in bf16 (2 bytes a weight), over the quantized kernels (every projection of the numbered
  blocks: the default selection) and over the whole model (embeddings, head, norms counted in bf16),
  for SmolLM2-135M (the shipped GGUF) and TinyLlama-1.1B's shape (abstract params: ``jax.eval_shape``
  of ``jlora.quantize``, nothing materialised); also with ``embeddings=True, lm_head=True``.
  Goals: NF4 <= 0.30x, int8 <= 0.53x.
- ``memory`` (compile only): XLA's compiled memory (arguments + temporaries) of a train step of the
  llama-1b shape, LoRA r=8 on q_proj, v_proj, adamw, the CLI's fused LM-head loss:
  bf16 base vs ``jlora.quantize(params, "nf4" | "int8", dtype=bfloat16)``, at each ``--shapes`` batch; the
  same in float32 (``--dtypes``), where XLA:CPU keeps no float32 copies of bf16 kernels for its dots
  (the bf16 LoRA step's temporaries hold one of every kernel). Goal (bf16): QLoRA NF4 <= 0.45x LoRA.
- ``memory-scan`` (compile only): the same comparison on the GPU recipe's model (``llama_workload``:
  ``nn.scan`` over the layers, per-layer remat, bf16), at ``--scan-shapes``.
- ``qwix``: the issue's anchor (HF Flax Llama module, 8 layers, d=1024, MLP 2816, vocab 8000, batch
  4x128 random ids, fp32, LoRA r=8 alpha=16 on q_proj, v_proj; QLoRA: every projection NF4, qwix tile
  64): jlora LoRA / QLoRA (``jlora.apply(module.apply, config)``) and qwix 0.1.8 LoRA / QLoRA
  (``qwix.apply_lora_to_model(module, qwix.LoraProvider(rules))``, base pre-quantized with
  ``qwix.quantize_params``) on the same linen module, base weights, adapters (jlora's lora_a copied
  into qwix's ``kernel_lora_a``) and loss (mean softmax cross-entropy over the logits); one
  ``jlora.make_train_step(loss, adamw, donate=False)`` for all four. Compiled memory and step times
  alternated in one process (``timing.alternate``: ``--rounds`` rounds of ``--steps`` steps each,
  order rotated, other processes' CPU sampled per round). Goal: jlora <= qwix on time and memory.
- ``perplexity``: the CLI's held-out perplexity (``jlora finetune --task causal-lm`` defaults:
  bbc-headlines, its seeded held-out split, first ``--eval-examples`` examples, packed rows,
  ``make_loss`` + ``make_scorer``) of SmolLM2-135M (float32, as dequantized from its Q4_1 GGUF) at a
  zero adapter, against the file's own Q4_1 blocks kept (``--quantize gguf``), the same base quantized
  NF4 / int8, and (qwix installed) a reference NF4 (qwix's,
  no double quantization) dequantized to float32. Goal: NF4 within +3% of float.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from jlora.tree import flatten
from machine import CpuLoad, header_lines, loadavg, machine_info, md_row
from timing import alternate, paired, round_medians, spread, summary, write_result

PARTS = ("bytes", "memory", "memory-scan", "qwix", "perplexity")
LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False)
ANCHOR = dict(vocab_size=8000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
              num_key_value_heads=16, max_position_embeddings=128, tie_word_embeddings=False)
GOALS = {"bytes_nf4": 0.30, "bytes_int8": 0.53, "memory_nf4": 0.45, "ppl_nf4": 1.03}
SIDES = ("jlora_lora", "qwix_lora", "jlora_qlora", "qwix_qlora")
MiB = 2 ** 20


def stored_bytes(tree: Any) -> int:
    """Bytes of every leaf as XLA stores it (4-bit types: half a byte, as qwix's uint4 codes)."""
    return sum(math.prod(x.shape) * jax.dtypes.itemsize_bits(x.dtype) // 8 for x in jax.tree_util.tree_leaves(tree))


def llama(cfg: dict, *, dtype: Any = jnp.float32, positions: int = 128) -> tuple[Any, Any]:
    """A FlaxLlamaForCausalLMFixed of ``cfg`` and its abstract params (ShapeDtypeStructs)."""
    from transformers import LlamaConfig
    from jlora.hf.llama import FlaxLlamaForCausalLMFixed
    model = FlaxLlamaForCausalLMFixed(LlamaConfig(**{"max_position_embeddings": positions, **cfg}), dtype=dtype,
                                      _do_init=False)
    return model, jax.eval_shape(lambda: model.init_weights(jax.random.key(0), (1, 8)))


# ---- bytes --------------------------------------------------------------------------------------------------------
def quantized_bytes(params: Any, fmt: str, everything: bool = False) -> dict[str, Any]:
    """Bytes of the quantized kernels and of the whole model vs bf16 (abstract: nothing is computed);
    ``everything``: the embedding tables and the LM head quantized too."""
    q = jax.eval_shape(lambda p: jlora.quantize(p, fmt, embeddings=everything, lm_head=everything), params)
    kernels, weights, others = 0, 0, 0
    for leaf in jax.tree_util.tree_leaves(q, is_leaf=jlora.is_quantized):
        if jlora.is_quantized(leaf):
            kernels, weights = kernels + leaf.nbytes, weights + math.prod(leaf.shape)
        else:
            others += math.prod(leaf.shape)
    return {"format": fmt, "quantized_weights": weights, "other_weights": others, "kernels_bytes": kernels,
            "kernels_bf16_bytes": 2 * weights, "kernels_ratio": kernels / (2 * weights),
            "bytes_per_weight": kernels / weights, "model_bytes": kernels + 2 * others,
            "model_bf16_bytes": 2 * (weights + others),
            "model_ratio": (kernels + 2 * others) / (2 * (weights + others))}


def part_bytes(args: argparse.Namespace) -> dict[str, Any]:
    from jlora.hf.llama import load_gguf_llama
    from jlora.hf.shipped import smollm2_gguf_path
    _, smol = load_gguf_llama(smollm2_gguf_path())
    models = {"SmolLM2-135M (shipped GGUF)": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), smol),
              "llama-1b shape (TinyLlama-1.1B)": llama(LLAMA_1B)[1]}
    return {name: {**{fmt: quantized_bytes(p, fmt) for fmt in ("nf4", "int8")},
                   **{f"{fmt} +embeddings/head": quantized_bytes(p, fmt, True) for fmt in ("nf4", "int8")}}
            for name, p in models.items()}


# ---- memory -------------------------------------------------------------------------------------------------------
def memory_of(compiled: Any) -> dict[str, int]:
    m = compiled.memory_analysis()
    return {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "temp", "output", "alias")}


def part_memory(args: argparse.Namespace) -> dict[str, Any]:
    config = jlora.LoraConfig(r=8, lora_alpha=16, target_modules=("q_proj", "v_proj"))
    tx, out = optax.adamw(1e-3), {}
    for shape in args.shapes.split(","):
        for dtype in args.dtypes.split(","):
            b, t = (int(v) for v in shape.split("x"))
            model, params = llama(LLAMA_1B, dtype=jnp.dtype(dtype), positions=t)
            params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), params)
            f = jlora.apply(model, config)

            def loss(tr: Any, fz: Any, batch: dict, f: Any = f) -> jax.Array:  # the CLI's fused LM-head loss
                hidden = f(fz, tr, batch["ids"], output_hidden_states=True).hidden_states[-1]
                labels, weights = jlora.next_token_targets(batch["ids"])
                return jlora.lm_head_cross_entropy(hidden, fz["lm_head"]["kernel"], labels, weights)
            rows, base = {}, dtype.replace("float", "f")  # bf16 / f32
            for name, fmt in ((f"lora_{base}", None), ("qlora_nf4", "nf4"), ("qlora_int8", "int8")):
                p = params if fmt is None else jax.eval_shape(lambda x: jlora.quantize(x, fmt, dtype=dtype), params)
                lora = jax.eval_shape(lambda x: jlora.init(jax.random.key(0), x, config), p)
                tr, fz = jlora.split(p, lora, config)
                start = time.perf_counter()
                compiled = jlora.make_train_step(loss, tx, donate=False).lower(
                    tr, jax.eval_shape(tx.init, tr), fz, {"ids": jax.ShapeDtypeStruct((b, t), jnp.int32)}).compile()
                mem = memory_of(compiled)
                rows[name] = {**mem, "args_plus_temps": mem["argument"] + mem["temp"],
                              "base_bytes": jlora.base_bytes(fz), "compile_s": time.perf_counter() - start}
                print(f"memory {shape} {dtype} {name}: {rows[name]}", flush=True)
            for name in ("qlora_nf4", "qlora_int8"):
                rows[name]["ratio"] = rows[name]["args_plus_temps"] / rows[f"lora_{base}"]["args_plus_temps"]
                rows[name]["argument_ratio"] = rows[name]["argument"] / rows[f"lora_{base}"]["argument"]
            out[f"{shape} {dtype}"] = rows
    return out


def part_memory_scan(args: argparse.Namespace) -> dict[str, Any]:
    """The GPU recipe's model (``llama_workload``: TinyLlama's shape, ``nn.scan`` over the layers with
    per-layer remat, plain float32 cross-entropy over the logits), bf16, compile only: LoRA vs QLoRA."""
    from llama_workload import LLAMA_WORKLOADS, lower_abstract
    out = {}
    for shape in args.scan_shapes.split(","):
        b, t = (int(v) for v in shape.split("x"))
        spec, rows = dict(LLAMA_WORKLOADS["llama-1b"], batch=b, seq=t), {}
        for name, variant, fmt in (("lora_bf16", "jlora_lora", None), ("qlora_nf4", "jlora_qlora", "nf4"),
                                   ("qlora_int8", "jlora_qlora", "int8")):
            start = time.perf_counter()
            mem = memory_of(lower_abstract(spec, jnp.bfloat16, variant, quantize=fmt).compile())
            rows[name] = {**mem, "args_plus_temps": mem["argument"] + mem["temp"],
                          "compile_s": time.perf_counter() - start}
            print(f"memory-scan {shape} {name}: {rows[name]}", flush=True)
        for name in ("qlora_nf4", "qlora_int8"):
            rows[name]["ratio"] = rows[name]["args_plus_temps"] / rows["lora_bf16"]["args_plus_temps"]
        out[f"{shape} bfloat16 (scan + remat)"] = rows
    return out


# ---- qwix ---------------------------------------------------------------------------------------------------------
def part_qwix(args: argparse.Namespace) -> dict[str, Any]:
    import flax.traverse_util as tu
    import qwix
    from transformers import FlaxLlamaForCausalLM, LlamaConfig
    module = FlaxLlamaForCausalLM(LlamaConfig(**ANCHOR), _do_init=False).module  # rope_theta 1e4: HF's own is exact
    b, t = 4, ANCHOR["max_position_embeddings"]
    rng = np.random.default_rng(0)
    batch = {"ids": jnp.asarray(rng.integers(0, ANCHOR["vocab_size"], (b, t)), jnp.int32),
             "mask": jnp.ones((b, t), jnp.int32), "pos": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))}
    params = jax.jit(lambda: module.init(jax.random.key(0), batch["ids"], batch["mask"], batch["pos"])["params"])()
    qv, proj = r"model/layers/\d+/self_attn/(q_proj|v_proj)", r"model/layers/\d+/(self_attn|mlp)/\w+_proj"

    def ce(logits: jax.Array, ids: jax.Array) -> jax.Array:  # the same loss on every side
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), ids[:, 1:]).mean()
    config = jlora.LoraConfig(r=8, lora_alpha=16, target_modules=("q_proj", "v_proj"))
    f = jlora.apply(module.apply, config)

    def jlora_loss(tr: Any, fz: Any, bt: dict) -> jax.Array:
        return ce(f(fz, tr, bt["ids"], bt["mask"], bt["pos"]).logits, bt["ids"])
    sides, lora = {}, jlora.init(jax.random.key(1), {"params": params}, config)  # one draw for all four
    lora_a = {k[1:-1]: v for k, v in flatten(lora).items() if k[-1] == "lora_a"}
    for name, fmt in (("jlora_lora", None), ("jlora_qlora", "nf4")):
        variables = {"params": params if fmt is None else jax.jit(lambda p: jlora.quantize(p, fmt))(params)}
        sides[name] = (jlora_loss, *jlora.split(variables, lora, config))
    rules = {"qwix_lora": [qwix.LoraRule(module_path=qv, rank=8, alpha=16.0)],
             "qwix_qlora": [qwix.LoraRule(module_path=qv, rank=8, alpha=16.0, weight_qtype="nf4", tile_size=64),
                            qwix.QuantizationRule(module_path=proj, weight_qtype="nf4", tile_size=64)]}
    for name, rule in rules.items():
        qmodule = qwix.apply_lora_to_model(module, qwix.LoraProvider(rule))
        abstract = jax.eval_shape(qmodule.init, jax.random.key(0), batch["ids"], batch["mask"], batch["pos"])["params"]
        frozen = jax.jit(lambda p, a=abstract: qwix.quantize_params(p, a))(params) if "qlora" in name else params
        trainable = {}
        for k, v in tu.flatten_dict(abstract).items():
            if k[-1] == "kernel_lora_a":
                trainable[k] = lora_a[k[:-1]]
            elif k[-1] == "kernel_lora_b":
                trainable[k] = jnp.zeros(v.shape, v.dtype)

        def qwix_loss(tr: Any, fz: Any, bt: dict, qm: Any = qmodule) -> jax.Array:
            p = tu.unflatten_dict({**tu.flatten_dict(fz), **tu.flatten_dict(tr)})
            return ce(qm.apply({"params": p}, bt["ids"], bt["mask"], bt["pos"]).logits, bt["ids"])
        sides[name] = (qwix_loss, tu.unflatten_dict(trainable), frozen)
    tx, runs, result = optax.adamw(1e-3), {}, {}
    for name in SIDES:
        loss, tr, fz = sides[name]
        opt = tx.init(tr)
        start = time.perf_counter()
        compiled = jlora.make_train_step(loss, tx, donate=False).lower(tr, opt, fz, batch).compile()
        compile_s = time.perf_counter() - start
        tr1, opt1, loss0 = compiled(tr, opt, fz, batch)
        loss1 = compiled(tr1, opt1, fz, batch)[2]
        mem = memory_of(compiled)
        result[name] = {**mem, "args_plus_temps": mem["argument"] + mem["temp"], "frozen_bytes": stored_bytes(fz),
                        "trainable_params": sum(x.size for x in jax.tree_util.tree_leaves(tr)), "compile_s": compile_s,
                        "loss0": float(loss0), "loss1": float(loss1)}
        print(f"qwix part {name}: {result[name]}", flush=True)
        box = {"t": tr1, "o": opt1}

        def run(c: Any = compiled, fz: Any = fz, box: dict = box) -> jax.Array:
            box["t"], box["o"], value = c(box["t"], box["o"], fz, batch)
            return value
        runs[name] = run
    before = loadavg()
    alt = alternate(runs, args.rounds, args.steps, sample_load=CpuLoad().sample)
    for name in SIDES:
        result[name]["step_s"] = summary(round_medians(alt, name))
    result["ratios"] = {f"{a}/{b}": paired(alt, a, b) for a, b in (("jlora_lora", "qwix_lora"),
                        ("jlora_qlora", "qwix_qlora"), ("jlora_qlora", "jlora_lora"), ("qwix_qlora", "qwix_lora"))}
    result["alternation"] = {"rounds": args.rounds, "steps_per_round": args.steps, "times_s": alt["rounds"],
                             "order": alt["order"], "first_s": alt["first_s"], "load": alt["load"],
                             "other_cores": summary([x["other_cores"] for x in alt["load"] if x]),
                             "loadavg_before": before, "loadavg_after": loadavg()}
    result["workload"] = {**ANCHOR, "batch": [b, t], "dtype": "float32", "r": 8, "alpha": 16,
                          "qwix": qwix.__version__}
    return result


# ---- perplexity ---------------------------------------------------------------------------------------------------
def part_perplexity(args: argparse.Namespace) -> dict[str, Any]:
    from jlora.app import causal_lm as clm
    from jlora.app.finetune import FinetuneOptions
    from jlora.app.lm_job import load_model
    options = FinetuneOptions(task="causal-lm", eval_examples=args.eval_examples).resolved()  # the CLI's defaults
    lm = load_model(options)
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    _, held_enc, _ = clm.split_encoded(tok, clm.load_examples(options.data), max_length=options.max_length,
                                       seq_len=options.seq_len, eval_fraction=options.eval_fraction, seed=options.seed)
    held = clm.rows(held_enc[:options.eval_examples], options.seq_len, packed=options.pack, pad_id=pad)
    config = jlora.hf.default_config(lm.model, r=options.rank, lora_alpha=options.alpha)
    trainable, frozen = jlora.split(lm.params, jlora.init(jax.random.key(options.seed), lm.params, config), config)
    f = jlora.apply(lm.model, config)
    out = {"data": options.data, "held_out_examples": len(held_enc[:options.eval_examples]),
           "rows": int(len(held["input_ids"])), "seq_len": options.seq_len,
           "target_tokens": int(np.asarray(clm.target_weight(held))), "source": lm.source}
    kept = jlora.split(load_model(dataclasses.replace(options, quantize="gguf")).params, {}, config)[1]
    bases = {"float32": frozen, "gguf_q4_1_kept": kept, "nf4": jlora.quantize(frozen, "nf4"),
             "int8": jlora.quantize(frozen, "int8")}
    try:  # a reference NF4 (qwix's: blocks of 64, float32 scales, no double quantization), dequantized to float32
        import qwix
        bases["nf4_qwix_dequantized"] = jax.tree_util.tree_map_with_path(lambda k, w: qwix.dequantize(qwix.quantize(
            w, "nf4", channelwise_axes=[1], tiled_axes={0: 64})) if "layers" in jax.tree_util.keystr(k)
            and jax.tree_util.keystr(k).endswith("['kernel']") else w, frozen)
    except ImportError:
        pass
    for name, base in bases.items():
        score = clm.make_scorer(clm.make_loss(lm, f, targets_cap=clm.targets_cap(held, options.batch)), options.batch)
        start = time.perf_counter()
        out[name] = {**score(trainable, base, held), "base_bytes": jlora.base_bytes(base),
                     "seconds": time.perf_counter() - start}
        print(f"perplexity {name}: {out[name]}", flush=True)
    for name in bases:
        out[name]["ratio"] = out[name]["eval_perplexity"] / out["float32"]["eval_perplexity"]
    return out


# ---- report -------------------------------------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def table(result: dict[str, Any]) -> str:
    mib = lambda n: f"{n / MiB:,.1f}"  # noqa: E731
    lines = header_lines(result)
    if "bytes" in result:
        lines += ["", "Base bytes vs the same params in bf16 (scales included; whole model: other leaves in bf16)",
                  "| model | format | B/weight | quantized kernels MiB (bf16) | ratio | whole model MiB (bf16) | ratio "
                  "| goal |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for model, by_fmt in result["bytes"].items():
            for fmt, r in by_fmt.items():
                goal = GOALS[f"bytes_{fmt.split()[0]}"]
                lines.append(md_row(model, [fmt, f"{r['bytes_per_weight']:.3f}",
                                            f"{mib(r['kernels_bytes'])} ({mib(r['kernels_bf16_bytes'])})",
                                            f"{r['kernels_ratio']:.3f}",
                                            f"{mib(r['model_bytes'])} ({mib(r['model_bf16_bytes'])})",
                                            f"{r['model_ratio']:.3f}",
                                            f"<= {goal}: kernels {verdict(r['kernels_ratio'] <= goal)}, "
                                            f"model {verdict(r['model_ratio'] <= goal)}"]))
    if "memory" in result or "memory-scan" in result:
        result.setdefault("memory", {})
        lines += ["", "XLA compiled memory of a train step, llama-1b shape, LoRA r=8 q/v, adamw (compile only, MiB); "
                  "NF4 / int8 dequantize to the model dtype. HF Flax Llama, layers unrolled, fused LM-head loss; "
                  "(scan + remat): the GPU recipe's llama_workload model, plain cross-entropy",
                  "| batch, dtype | step | arguments | temps | args + temps | / LoRA | goal |",
                  "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
        for shape, rows in [*result["memory"].items(), *result.get("memory-scan", {}).items()]:
            for name, r in rows.items():
                ratio = r.get("ratio")
                lines.append(md_row(shape, [name, mib(r["argument"]), mib(r["temp"]), mib(r["args_plus_temps"]),
                                            "1" if ratio is None else f"{ratio:.3f}",
                                            f"<= {GOALS['memory_nf4']}: {verdict(ratio <= GOALS['memory_nf4'])}"
                                            if name == "qlora_nf4" and "bfloat16" in shape else ""]))
    if "qwix" in result:
        q = result["qwix"]
        w, alt = q["workload"], q["alternation"]
        lines += ["", f"jlora vs qwix {w['qwix']}: HF Flax Llama module, {w['num_hidden_layers']} layers, d="
                  f"{w['hidden_size']}, vocab {w['vocab_size']}, batch {w['batch'][0]}x{w['batch'][1]}, fp32, LoRA "
                  f"r={w['r']} q/v; QLoRA: every projection NF4; alternated {alt['rounds']} rounds x "
                  f"{alt['steps_per_round']} steps",
                  "| step | arguments MiB | temps MiB | args + temps | frozen base MiB | step s median (min–max) | "
                  "loss0 | loss after 1 step |", "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
        for name in SIDES:
            r = q[name]
            lines.append(md_row(name, [mib(r["argument"]), mib(r["temp"]), mib(r["args_plus_temps"]),
                                       mib(r["frozen_bytes"]), spread(r["step_s"], ".3f"), f"{r['loss0']:.6f}",
                                       f"{r['loss1']:.6f}"]))
        for key, r in q["ratios"].items():
            lines.append(f"step time {key} = {spread(r, '.3f')} (per round: "
                         + " ".join(f"{x:.3f}" for x in r["per_round"]) + ")")
        for kind in ("lora", "qlora"):
            j, x = q[f"jlora_{kind}"], q[f"qwix_{kind}"]
            lines.append(f"goal jlora <= qwix ({kind}): memory {mib(j['args_plus_temps'])} vs "
                         f"{mib(x['args_plus_temps'])} MiB {verdict(j['args_plus_temps'] <= x['args_plus_temps'])}; "
                         f"time ratio {q['ratios'][f'jlora_{kind}/qwix_{kind}']['median']:.3f} "
                         f"{verdict(q['ratios'][f'jlora_{kind}/qwix_{kind}']['median'] <= 1.0)}")
        other = alt["other_cores"]
        lines.append("other processes' CPU during the rounds (cores): " + (
            f"median {other['median']:.2f} (min–max {other['min']:.2f}–{other['max']:.2f})" if other else "n/a")
            + f"; loadavg before {alt['loadavg_before']}, after {alt['loadavg_after']}")
    if "perplexity" in result:
        p = result["perplexity"]
        lines += ["", f"Held-out perplexity, SmolLM2-135M at a zero adapter, {p['data']} (the CLI's split: "
                  f"{p['held_out_examples']} examples, {p['rows']} packed rows of {p['seq_len']}, "
                  f"{p['target_tokens']} target tokens)",
                  "| base | base MiB | held-out loss | perplexity | / float32 | goal |",
                  "| --- | ---: | ---: | ---: | ---: | --- |"]
        for name in (n for n in p if isinstance(p[n], dict)):
            r = p[name]
            lines.append(md_row(name, [mib(r["base_bytes"]), f"{r['eval_loss']:.4f}", f"{r['eval_perplexity']:.2f}",
                                       f"{r.get('ratio', 1.0):.4f}",
                                       f"<= {GOALS['ppl_nf4']}: {verdict(r['ratio'] <= GOALS['ppl_nf4'])}"
                                       if name == "nf4" else ""]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--shapes", default="4x512,1x512,1x128", help="memory part: batch x seq_len, comma-separated")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="memory part: params and model dtypes")
    parser.add_argument("--scan-shapes", default="4x2048,1x2048", help="memory-scan part: batch x seq_len")
    parser.add_argument("--rounds", type=int, default=5, help="qwix part: rounds of alternation (>= 3)")
    parser.add_argument("--steps", type=int, default=2, help="qwix part: timed steps of each side per round")
    parser.add_argument("--eval-examples", type=int, default=64, help="perplexity part: held-out examples (CLI: 64)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/issue13"))
    args = parser.parse_args()
    parts = [p.strip() for p in args.part.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--part: unknown {unknown}; expected some of {PARTS}")
    path = args.out / "qlora.json"
    result = json.loads(path.read_text()) if path.exists() else {}  # parts run before are kept
    result.pop("table", None)
    before = loadavg()
    runners = {"bytes": part_bytes, "memory": part_memory, "memory-scan": part_memory_scan, "qwix": part_qwix,
               "perplexity": part_perplexity}
    for part in parts:
        start = time.perf_counter()
        result[part] = runners[part](args)
        result.setdefault("runs", {})[part] = {"seconds": time.perf_counter() - start, "loadavg_after": loadavg(),
                                               "args": vars(args) | {"out": str(args.out)}}
    result["machine"] = {"info": machine_info(), "loadavg_before": before, "loadavg_after": loadavg(), "parts": parts}
    write_result(args.out, "qlora", result, table)


if __name__ == "__main__":
    main()
