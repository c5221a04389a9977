"""Each speed lever of issue 11 against the code it replaced, alternated in one process, with the
op-class profile of every variant.

    python benchmarks/levers.py --workload W2 --rounds 5 --steps 2 [--wait-quiet 120] [--profile] [--out DIR]
    python benchmarks/levers.py --workload main ...      # the `jlora finetune` step (MiniLM, 16 x 128)

Variants, each compiled once and then timed in turns (timing.alternate; ratios per round, median
and min-max over rounds; the XLA matmul probe of machine.py in the same rounds is the yardstick):

* GPT-2 workloads (W1, W2, tiny; gpt2_workload.py, fused loss): ``issue10`` - the LoRA delta and the
  fused LM-head loss as they were (legacy_paths.py patched in while the step is traced);
  ``lora_scale`` - today's delta (scale on the rank-r hidden), the old loss; ``now`` - both of today.
* ``main`` (the CLI's step, built with jlora.app.finetune's own functions): ``issue10`` - the old
  delta, dropout keys of jax's default threefry impl (as the CLI drew them then); ``lora_scale`` -
  today's delta, the default keys; ``now`` - the step the CLI runs today (jlora.rng keys: the same
  bits, threefry's rounds unrolled); ``rbg_dropout`` - today's delta with keys of jax's ``rbg`` impl
  (XLA's RngBitGenerator; a lever tried, not kept).

``--profile`` adds, per variant, the op classes (op_profile.py: matmul / elementwise+reduce /
copy/transpose; ms per step, GFLOP/s) from a jax.profiler trace.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import jlora
import jlora.intercept
import legacy_paths
import op_profile
from machine import CpuLoad, machine_info, machine_line, matmul_probes, wait_quiet
from timing import alternate, paired, round_medians, spread

GPT2 = {"W1": dict(n_layer=4, n_embd=256, n_head=4, batch=8, seq=128),
        "W2": dict(n_layer=12, n_embd=768, n_head=12, batch=8, seq=128),
        "tiny": dict(n_layer=2, n_embd=64, n_head=2, batch=2, seq=32)}


@contextlib.contextmanager
def patched(delta: bool, loss: bool):
    """The issue-10 LoRA delta (``delta``) and/or fused loss (``loss``) in place while a step is traced."""
    saved = (jlora.intercept.dense_delta, jlora.intercept.fused_dense_delta, jlora.lm_head_cross_entropy)
    if delta:
        jlora.intercept.dense_delta = legacy_paths.dense_delta
        jlora.intercept.fused_dense_delta = legacy_paths.fused_dense_delta
    if loss:
        jlora.lm_head_cross_entropy = legacy_paths.lm_head_cross_entropy
    try:
        yield
    finally:
        jlora.intercept.dense_delta, jlora.intercept.fused_dense_delta, jlora.lm_head_cross_entropy = saved


def compiled_step(step: Callable, args: tuple) -> tuple[Callable[[], Any], Any]:
    """``(run, compiled)``: ``run()`` is one step, its new state fed back (nothing donated). Traced
    afresh (a new function object: jax.jit caches traces per function, which would ignore a patch)."""
    compiled = jax.jit(lambda *a: step(*a)).lower(*args).compile()
    box = list(args)

    def run():
        box[0], box[1], loss = compiled(*box)
        return loss
    return run, compiled


def gpt2_variants(workload: str, vocab: int) -> tuple[dict[str, tuple], float]:
    """``({variant: (run, compiled)}, XLA FLOPs of the step with the plain loss)``."""
    import gpt2_workload as g
    spec = GPT2[workload]
    built = g.build_jax(g.gpt2_config(spec, vocab), spec, loss="fused")
    step, state, tx, rest = built["steps"]["jlora_lora"]
    args = (state, tx.init(state), built["ids"], rest)
    out = {}
    for name, (delta, loss) in {"issue10": (True, True), "lora_scale": (False, True), "now": (False, False)}.items():
        with patched(delta, loss):
            out[name] = compiled_step(step, args)
    flops = g.xla_flops(built["plain_steps"]["jlora_lora"], state, args[1], built["ids"], rest)
    return out, flops


def main_variants() -> tuple[dict[str, tuple], float]:
    """The `jlora finetune` step (defaults: MiniLM, batch 16 x 128, r=8 on query/value + head)."""
    from jlora.app import finetune as F
    from jlora.train import make_train_step
    options = F.FinetuneOptions().resolved()
    model, params, config, trainable, frozen = F.build(options, 5)
    f = jlora.apply(model, config)
    tx = F.make_optimizer(options, config)
    loss = lambda t, fz, b: F._loss_and_logits(model, f, t, fz, b, b["rng"], True)[0]  # noqa: E731
    rng = np.random.default_rng(0)
    batch = {"input_ids": jnp.asarray(rng.integers(0, 30000, (options.batch, options.max_length)), jnp.int32),
             "attention_mask": jnp.ones((options.batch, options.max_length), jnp.int32),
             "labels": jnp.asarray(rng.integers(0, 5, (options.batch,)), jnp.int32)}
    opt_state = tx.init(trainable)
    keys = {"default": jax.random.key(options.seed + 1), "cli": F.dropout_key(options.seed),
            "rbg": jax.random.key(options.seed + 1, impl="rbg")}
    out = {}
    for name, (delta, key) in {"issue10": (True, "default"), "lora_scale": (False, "default"), "now": (False, "cli"),
                               "rbg_dropout": (False, "rbg")}.items():
        with patched(delta, False):  # a step of its own per variant: a jitted step caches its trace
            step = make_train_step(lambda t, fz, b: loss(t, fz, b), tx, donate=False)
            run, compiled = compiled_step(step, (trainable, opt_state, frozen, {**batch, "rng": keys[key]}))
        out[name] = (run, compiled)
    cost = out["now"][1].cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return out, float(cost["flops"])


def profile(variants: dict[str, tuple]) -> dict[str, Any]:
    out = {}
    for name, (run, compiled) in variants.items():
        table = op_profile.breakdown(op_profile.trace_ops(run, 3), op_profile.hlo_ops(compiled.as_text()))
        out[name] = {"step_s": table["step_s"], "classes": table["classes"], "top": table["top"][:12]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=[*GPT2, "main"], default="W1")
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="steps of each variant per round")
    parser.add_argument("--wait-quiet", type=float, default=0.0)
    parser.add_argument("--quiet-below", type=float, default=0.25)
    parser.add_argument("--matmul-n", type=int, default=2048)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    variants, flops = main_variants() if args.workload == "main" else gpt2_variants(args.workload, args.vocab)
    probes, probe_flops = matmul_probes(args.matmul_n)
    runs = {name: run for name, (run, _) in variants.items()} | {"xla_matmul": probes["xla_matmul"]}
    load = CpuLoad()
    timed = alternate(runs, args.rounds, args.steps, sample_load=load.sample,
                      before_round=(lambda: wait_quiet(args.quiet_below, args.wait_quiet)) if args.wait_quiet else None)
    quiet = [i for i, x in enumerate(timed["load"]) if x and x["other_cores"] < args.quiet_below]
    result: dict[str, Any] = {"workload": args.workload, "machine": machine_info(), "step_flops": flops,
                              "rounds": timed, "quiet_rounds": quiet, "variants": {}}
    matmul = round_medians(timed, "xla_matmul")
    print(machine_line(result["machine"]))
    print(f"workload {args.workload}: {len(quiet)} of {args.rounds} rounds quiet; step {flops / 1e9:.1f} GFLOP (XLA)")
    print("| variant | step (s), median | / issue10, median (min–max) | GFLOP/s | share of XLA matmul |")
    print("| --- | --- | --- | --- | --- |")
    for name in variants:
        steps = round_medians(timed, name)
        ratio = paired(timed, name, "issue10")
        share = statistics.median(flops / s / (probe_flops / m) for s, m in zip(steps, matmul))
        result["variants"][name] = {"step_s": statistics.median(steps), "per_round_s": steps, "vs_issue10": ratio,
                                    "gflops_per_s": flops / statistics.median(steps) / 1e9, "matmul_share": share}
        print(f"| {name} | {statistics.median(steps):.3f} | {spread(ratio, '.3f')} | "
              f"{flops / statistics.median(steps) / 1e9:.0f} | {share:.2f} |")
    print(f"XLA {args.matmul_n}^2 fp32 matmul: {probe_flops / statistics.median(matmul) / 1e9:.0f} GFLOP/s")
    if args.profile:
        result["profile"] = profile(variants)
        for name, table in result["profile"].items():
            print(name, f"{table['step_s'] * 1e3:.0f} ms:", ", ".join(
                f"{kind} {c['seconds'] * 1e3:.0f} ms ({c['share']:.0%}, {c['gflops_per_s']:.0f} GFLOP/s)"
                for kind, c in sorted(table["classes"].items(), key=lambda kv: -kv[1]["seconds"])))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"levers_{args.workload}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
