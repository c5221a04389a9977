"""jlora vs PEFT (PyTorch) and vs full fine-tuning, on the same workload.

    python benchmarks/compare_peft.py [--workload W1|W2|tiny|llama-1b|llama-tiny] [--dtype float32|bfloat16|both]
                                      [--rounds 7] [--steps 3] [--pause 1.0] [--wait-quiet SECONDS]
                                      [--loss fused|plain] [--threads 2] [--jlora-python PY]
                                      [--peft-python .venv-peft/bin/python] [--rss] [--device cpu|gpu] [--out DIR]

W1: GPT-2 config, 4 layers, d=256, 4 heads, vocab 50257, batch 8x128, LoRA r=8 on c_attn (PEFT's
setting: the whole fused q,k,v projection); W2: GPT-2 small (124M). llama-1b: TinyLlama-1.1B's shape
(22 layers, d=2048, 32 heads, 4 kv heads, MLP 5632, vocab 32000), batch 4x2048, per-layer remat (HF
gradient checkpointing on the torch side), LoRA r=8, alpha=16 on q_proj, v_proj; llama-tiny: the same
code at 2 layers, d=64 (see llama_workload.py). Random init, dropout off, adamw, next-token loss.

GPT-2 workloads (W1, W2, tiny) run each side in its own interpreter (side_by_side.py, workers.py): the
jlora worker (``--jlora-python``, default this one) builds gpt2_workload's Flax GPT-2 and its jlora LoRA
and full fine-tuning steps, and writes the model (an HF folder, PyTorch names), the batch and its initial
``lora_a``; the PEFT worker (``--peft-python``, default ``.venv-peft/bin/python`` from
``benchmarks/setup-peft.sh``: torch 2.13 CPU, transformers 5, peft; no jax) loads them into
``GPT2LMHeadModel`` for PEFT LoRA and a plain PyTorch full fine-tune, so both sides start from the same
weights and batch; trainable counts must agree and the initial losses agree to 1e-4 relative (3e-2 in
bf16). ``--dtype`` (default both): float32, and bfloat16 for the LoRA steps -- jlora: the model computing
in bf16 with the frozen base stored in bf16, adapters and Adam state float32; PEFT: the base in bf16
weights and torch.autocast over float32, the faster being "PEFT bf16". Reported:

* each side's machine line: CPU model name and number, the flags that decide matmul speed (AVX2, AVX-512,
  AVX-512 BF16, AMX), cores, torch's and XLA's threads, library versions, ``/proc/loadavg`` before and after;
* train-step time: every step and one ``--matmul-n`` cube matmul per side and dtype (the practical FLOP/s
  limit of the box) are compiled and warmed up, then timed in alternation across the two workers
  (``workers.alternate``): ``--rounds`` rounds, each running ``--steps`` steps of every one in turn, the
  order rotated each round, ``--pause`` s of sleep before each turn (the idle threads of the side that just
  ran stop spinning). Ratios (jlora-LoRA/PEFT-LoRA in each dtype, jlora-LoRA/jlora-full, bf16/fp32 ...) are
  taken per round and reported as median and min–max over the rounds, never as ratios of medians measured
  apart. Each round also records how many cores other processes took (/proc/stat, the driver and its
  workers not counted), and the ratios are repeated over the "quiet" rounds (others < ``--quiet-below``
  cores): on a shared 2-core box contention does not slow both sides alike, so alternation alone does not
  make a contended round fair. ``--wait-quiet S`` waits up to S seconds before each round for a quiet
  machine. Step FLOPs (torch's FlopCounterMode matmul count plus the attention matmuls, the same for both
  frameworks; XLA's cost analysis beside it) over the step time, as a share of the matmul probe's FLOP/s of
  the same side, dtype and round;
* XLA's compiled memory analysis of the jlora steps beside the theoretical parameter + gradient +
  Adam-moment bytes and the no-recomputation floor of memory_theory.py; torch's live tensors in one step;
* inference latency (jit forward, jlora worker) at batch 1 x 128 and 16 x 256: base, merged, unmerged LoRA;
* adapter vs full checkpoint bytes;
* with ``--rss``, the peak RSS of each variant run alone in a worker of its own, beside each side's
  worker with its imports only.

Llama workloads (``--device gpu`` means llama-1b in bf16): llama_compare.py, torch then JAX each in a child
process of this interpreter (it needs jax and torch), not alternated. GPU recipe (one H100; python3 holding
jax[cuda] and torch with CUDA; run from the repo root)::

    PYTHONPATH=. python3 benchmarks/compare_peft.py --device gpu --steps 10 --qlora nf4 --out $OUT

The table is printed and written to ``<out>/compare_peft_<workload>.json`` (``..._plain.json`` with ``--loss plain``).
"""
from __future__ import annotations

import argparse
import os
import time

from memory_theory import floor, live_bytes, state_bytes
from side_by_side import Session, add_arguments, build_all, dtypes_of, measure, table_lines
from timing import write_result
from workers import Worker, python_of

LLAMA = ("llama-1b", "llama-tiny")
WORKLOADS = {"W1": dict(n_layer=4, n_embd=256, n_head=4, batch=8, seq=128),
             "W2": dict(n_layer=12, n_embd=768, n_head=12, batch=8, seq=128),
             "tiny": dict(n_layer=2, n_embd=64, n_head=2, batch=2, seq=32)}
INFERENCE_SHAPES = {"W1": ((1, 128), (16, 256)), "W2": ((1, 128), (16, 256)), "tiny": ((1, 32), (2, 64))}
VARIANTS = ("jlora_lora", "jlora_full", "peft_lora", "torch_full")
EXTRA_RATIOS = (("jlora_lora:float32", "jlora_full:float32"), ("peft_lora:float32", "torch_full:float32"),
                ("jlora_full:float32", "torch_full:float32"))


def floor_rows(spec: dict, vocab: int, result: dict) -> list[str]:
    """XLA's live bytes beside the no-recomputation floor of memory_theory (float32 steps)."""
    b, runs = result["bytes"], result["runs"]
    if "jlora_lora:float32" not in runs or "jlora_full:float32" not in runs:
        return []
    args = (spec, vocab, b["params"], b["trainable"], 4 * spec["batch"] * spec["seq"])
    same, aware = floor(*args), floor(*args, lora_aware=True, rank=result["lora_config"]["r"])
    lora_live, full_live = (live_bytes(runs[f"{v}:float32"]["memory"]) for v in ("jlora_lora", "jlora_full"))
    theory = state_bytes(b["params"], b["trainable"])
    result["floor"] = {"same_activations": same, "lora_aware": aware, "state": theory}
    mib = lambda x: f"{x / 2**20:.1f}"  # noqa: E731
    return ["| float32 memory (MiB) | jlora LoRA | jlora full |", "| --- | --- | --- |",
            f"| XLA live bytes (arguments + outputs - aliases + temps) | {mib(lora_live)} | {mib(full_live)} |",
            f"| theoretical params + grads + adam | {mib(theory['lora'])} | {mib(theory['full'])} |",
            f"| activations, analytic | {mib(same['activations_lora'])} | {mib(same['activations_full'])} |",
            f"| floor: state + activations | {mib(same['lora'])} | {mib(same['full'])} |",
            f"| XLA live / floor | {lora_live / same['lora']:.3f} | {full_live / same['full']:.3f} |",
            f"| LoRA-aware floor, XLA live / it | {mib(aware['lora'])}, {lora_live / aware['lora']:.3f} | |"]


def table(result: dict) -> str:
    spec, w = result["spec"], result["workload"]
    line = (f"workload {w}: {spec}, vocab {result['vocab']}, r={result['lora_config']['r']} on c_attn, "
            f"{result['threads']} torch threads, jlora loss {result['loss']}"
            + (f" (chunk {result['loss_chunk']})" if result["loss"] == "fused" else ""))
    lines = [*table_lines(result, line, ("tokens", spec["batch"] * spec["seq"])), "",
             *floor_rows(spec, result["vocab"], result)]
    if result.get("inference"):
        lines += ["", "| inference (jit forward, s) | base | merged | unmerged LoRA | merged / base | unmerged / base "
                  "|",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {shape} | {r['base_s']:.4f} | {r['merged_s']:.4f} | {r['unmerged_s']:.4f} | "
                  f"{r['merged_over_base']:.3f} | {r['unmerged_over_base']:.3f} |"
                  for shape, r in result["inference"].items()]
    if result.get("peak_rss_mib"):
        rss = result["peak_rss_mib"]
        lines += ["", "| peak RSS, own worker (MiB) | " + " | ".join(rss) + " |", "|" + " --- |" * (len(rss) + 1),
                  "| | " + " | ".join(f"{v:.0f}" for v in rss.values()) + " |"]
    b = result["bytes"]
    lines += ["", f"checkpoint bytes: adapters {b['trainable']:,} vs full {b['params']:,} "
              f"({b['params'] / b['trainable']:.0f}x smaller)"]
    return "\n".join(lines)


def measure_rss(args: argparse.Namespace, s: Session, jspec: dict, files: dict, lora: dict, lr: float) -> dict:
    """Peak RSS of each float32 variant in a fresh worker of its own (3 steps), and of each side's worker
    with its imports only."""
    rss = {}
    pythons = {"jlora": python_of(args.jlora_python), "peft": args.peft_python}
    for side in ("jlora", "peft"):
        with Worker(side, pythons[side], f"{side}_worker.py") as w:
            rss[f"{side}_imports"] = w.call("rss")["peak_rss_mib"]
    for variant in VARIANTS:
        side = "jlora" if variant.startswith("jlora") else "peft"
        with Worker(side, pythons[side], f"{side}_worker.py") as w:
            if side == "jlora":
                w.call("build", workload="gpt2", dtype="float32", dir=s.dir, variants=[variant], **jspec)
            else:
                w.call("build", workload="gpt2", dtype="float32", files=files, lora_config=lora, lr=lr,
                       threads=args.threads, variants=[variant])
            w.time(f"{variant}:float32", 3)
            rss[variant] = w.call("rss")["peak_rss_mib"]
    return rss


def run_gpt2(args: argparse.Namespace) -> dict:
    spec = WORKLOADS[args.workload]
    jspec = {"spec": spec, "vocab": args.vocab, "loss": args.loss, "loss_chunk": args.loss_chunk}
    with Session(args) as s:
        built = build_all(s, "gpt2", jspec, {}, rtol=1e-4)
        j = built["jlora"]
        inference = None
        if not args.no_inference and "float32" in dtypes_of(args):
            inference = s.jlora.call("inference", shapes=INFERENCE_SHAPES[args.workload],
                                     rounds=args.rounds)["inference"]
        result = measure(s, built, EXTRA_RATIOS)
        rss = measure_rss(args, s, jspec, j["files"], j["lora_config"], j["lr"]) if args.rss else None
    result.update(workload=args.workload, spec=spec, vocab=args.vocab, loss=args.loss, loss_chunk=args.loss_chunk,
                  threads=args.threads, lora_config=j["lora_config"], bytes=j["bytes"], inference=inference,
                  peak_rss_mib=rss, device="cpu")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, rounds=7, steps=3)
    parser.set_defaults(dtype=None)
    parser.add_argument("--workload", choices=sorted([*WORKLOADS, *LLAMA]), help="default: W1 on cpu, llama-1b on gpu")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--attention", choices=("auto", "xla", "cudnn"), default="auto",
                        help="JAX attention of the llama workloads (auto: cuDNN on a GPU in bf16 if it runs)")
    parser.add_argument("--remat", action=argparse.BooleanOptionalAction,
                        help="llama workloads: per-layer remat / gradient checkpointing (default: the workload's)")
    parser.add_argument("--no-inference", action="store_true", help="GPT-2 workloads: skip the inference timing")
    parser.add_argument("--vocab", type=int, default=50257, help="GPT-2 workloads only")
    parser.add_argument("--loss", choices=("fused", "plain"), default="fused",
                        help="GPT-2 workloads, jlora side: jlora.lm_head_cross_entropy or optax on sliced logits")
    parser.add_argument("--loss-chunk", type=int, default=1024, help="chunk_size (vocab columns) of the fused loss")
    parser.add_argument("--qlora", choices=("nf4", "int8"), default=None,
                        help="llama workloads: also the LoRA step over a quantized base (QLoRA; jax side)")
    parser.add_argument("--rss", action="store_true", help="also peak RSS of each variant in its own process (cpu)")
    parser.add_argument("--only", choices=("none", *VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--part", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    gpu = args.device == "gpu"
    args.workload = args.workload or ("llama-1b" if gpu else "W1")
    args.matmul_n = args.matmul_n or (256 if args.workload == "tiny" else 2048)
    if args.workload in LLAMA:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # GPU: JAX's peak memory, not 75% of it
        import llama_compare
        from llama_workload import LLAMA_WORKLOADS
        args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
        if args.dtype == "both":
            parser.error("--dtype both: the llama workloads run one dtype at a time")
        if gpu and args.rss:
            parser.error("--rss measures host RSS of CPU runs; it is not available with --device gpu")
        spec = dict(LLAMA_WORKLOADS[args.workload])
        if args.remat is not None:
            spec["remat"] = args.remat
        if args.only:
            return llama_compare.run_only(args, spec)
        if args.part:
            return llama_compare.run_part(args, spec)
        return llama_compare.main_llama(args, spec)
    if gpu:
        parser.error("--device gpu runs the llama workloads only (the GPT-2 ones use transformers' Flax GPT-2, "
                     "which has no GPU recipe here)")
    args.dtype = args.dtype or "both"
    start = time.perf_counter()
    result = run_gpt2(args)
    result["wall_s"] = time.perf_counter() - start
    write_result(args.out, f"compare_peft_{args.workload}{'_plain' if args.loss == 'plain' else ''}", result, table)


if __name__ == "__main__":
    main()
