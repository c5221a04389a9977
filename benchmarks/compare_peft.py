"""jlora vs PEFT (PyTorch) and vs full fine-tuning, on the same workload.

    python benchmarks/compare_peft.py [--workload W1|W2|tiny|llama-1b|llama-tiny] [--rounds 7] [--steps 3]
                                      [--wait-quiet SECONDS] [--loss fused|plain] [--threads 2]
                                      [--device cpu|gpu] [--dtype float32|bfloat16] [--out DIR]

W1: GPT-2 config, 4 layers, d=256, 4 heads, vocab 50257, batch 8x128, LoRA r=8 on c_attn (PEFT's
setting: the whole fused q,k,v projection); W2: GPT-2 small (124M). llama-1b: TinyLlama-1.1B's shape
(22 layers, d=2048, 32 heads, 4 kv heads, MLP 5632, vocab 32000), batch 4x2048, per-layer remat (HF
gradient checkpointing on the torch side), LoRA r=8, alpha=16 on q_proj, v_proj; llama-tiny: the same
code at 2 layers, d=64 (see llama_workload.py). Random init, dropout off, adamw, next-token loss.

GPU recipe (one H100; python3 holding jax[cuda] and torch with CUDA; run from the repo root)::

    PYTHONPATH=. python3 benchmarks/compare_peft.py --device gpu --steps 10 --qlora nf4 --out $OUT

``--device gpu`` means llama-1b in bfloat16 (params, activations, Adam moments; logits and loss
float32; LoRA adapters float32 on both sides, as PEFT keeps them), cuDNN flash attention for JAX where
it runs (``--attention auto``; ``xla`` forces XLA's, JAX's own default), and MFU rows: analytic model
FLOPs (llama_workload.model_flops_per_step) and XLA's cost-analysis FLOPs over the step time, against
the device's dense bf16 peak, plus each side's peak device memory. The GPT-2 workloads run in this
process; the llama ones run torch, then JAX, each in a child process of its own (the whole device
each; no torch/JAX CUDA-library or allocator interplay). On CPU, ``--workload llama-tiny [--dtype
bfloat16]`` runs the same code path. Reports, side by side:

* the machine: CPU model name and number, the flags that decide matmul speed (AVX2, AVX-512,
  AVX-512 BF16, AMX), cores, torch's and XLA's threads, library versions, ``/proc/loadavg`` before
  and after (machine.py);
* train-step time, GPT-2 workloads: the four steps (jlora LoRA, PEFT LoRA, jlora full, PyTorch
  full) and one large fp32 matmul in XLA and in torch (``--matmul-n``, the practical FLOP/s limit
  of the box) are compiled and warmed up, then timed in alternation in this one process:
  ``--rounds`` rounds, each running ``--steps`` steps of every one in turn, the order rotated each
  round (timing.alternate). Ratios (jlora-LoRA/PEFT-LoRA, jlora-LoRA/jlora-full, ...) are taken per
  round and reported as median and min–max over the rounds, never as ratios of medians measured
  apart. Each round also records how many cores other processes took (/proc/stat), and the ratios
  are repeated over the "quiet" rounds (other processes < ``--quiet-below`` cores): on a shared
  2-core box contention does not slow both sides alike (PEFT's 2-thread OpenMP loops slowed 4-5x
  when another process took one core, XLA's steps ~1.8x), so alternation alone does not make a
  contended round fair. ``--wait-quiet S`` waits up to S seconds before each round for a quiet
  machine. Step FLOPs (torch's FlopCounterMode matmul count plus the attention matmuls, the same
  for both frameworks; XLA's cost analysis beside it) over the step time, as a share of the
  matmul probe's FLOP/s in the same framework and round. Llama workloads: median of ``--steps``
  steps after warm-up, each side in its own process (not alternated);
* XLA's compiled memory analysis of the jlora LoRA and full steps, beside the theoretical
  parameter + gradient + Adam-moment bytes and (GPT-2 workloads) the no-recomputation floor of
  memory_theory.py: state + the activations a backward pass reads;
* inference latency (jit forward) at batch 1 x 128 and 16 x 256 (llama-1b: 4 x 2048): base, merged,
  unmerged LoRA;
* adapter vs full checkpoint bytes;
* with ``--rss``, the peak RSS of each variant run alone in a child process of its own (RSS is per
  process, so it cannot be told apart inside the one timing process).

The table is printed and written to ``<out>/compare_peft_<workload>.json`` (``..._plain.json`` with ``--loss plain``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # GPU: JAX's peak memory, not 75% of it
import jax  # noqa: E402

from gpt2_workload import (RANK, build_jax, gpt2_config, jax_inference, measure_jax, measure_torch,  # noqa: E402
                           prepare_jax, prepare_torch)
from machine import CpuLoad, loadavg, machine_info, machine_line, matmul_probes, wait_quiet  # noqa: E402
from timing import alternate, paired, round_medians, spread, summary  # noqa: E402
from memory_theory import floor, live_bytes, state_bytes  # noqa: E402
from llama_workload import (LLAMA_INFERENCE_SHAPES, LLAMA_WORKLOADS, measure_jax_llama,  # noqa: E402
                            measure_torch_llama, mfu, model_flops_per_step, peak_flops)

WORKLOADS = {"W1": dict(n_layer=4, n_embd=256, n_head=4, batch=8, seq=128),
             "W2": dict(n_layer=12, n_embd=768, n_head=12, batch=8, seq=128),
             "tiny": dict(n_layer=2, n_embd=64, n_head=2, batch=2, seq=32), **LLAMA_WORKLOADS}
INFERENCE_SHAPES = {"W1": ((1, 128), (16, 256)), "W2": ((1, 128), (16, 256)), "tiny": ((1, 32), (2, 64)),
                    **LLAMA_INFERENCE_SHAPES}


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
                               "--threads", str(args.threads), "--steps", "3", "--dtype", args.dtype,
                               "--loss", args.loss, "--loss-chunk", str(args.loss_chunk), "--only",
                               variant, *([] if args.remat is None else ["--remat" if args.remat else "--no-remat"])],
                              capture_output=True, text=True, check=True)
        rss[variant] = json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mib"]
    return rss


def run_only(args: argparse.Namespace, spec: dict) -> None:
    """Child mode of ``--rss``: run one variant's steps and print its peak RSS as JSON."""
    llama = args.workload in LLAMA_WORKLOADS
    if args.only in ("jlora_lora", "jlora_full"):
        if llama:
            measure_jax_llama(spec, args.steps, args.dtype, variants=(args.only,))
        else:
            measure_jax(gpt2_config(spec, args.vocab), spec, args.steps, (), variants=(args.only,), loss=args.loss,
                        chunk_size=args.loss_chunk)
    elif args.only in ("peft_lora", "torch_full"):
        if llama:
            measure_torch_llama(spec, args.steps, "cpu", args.dtype, variants=(args.only,), threads=args.threads)
        else:
            measure_torch(gpt2_config(spec, args.vocab), spec, args.steps, args.threads, variants=(args.only,))
    print(json.dumps({"variant": args.only, "peak_rss_mib": peak_rss_mib()}))


def floor_rows(spec: dict, vocab: int, jax_result: dict) -> list[str]:
    """XLA's live bytes beside the no-recomputation floor of memory_theory (GPT-2 workloads)."""
    b = jax_result["bytes"]
    args = (spec, vocab, b["params"], b["trainable"], 4 * spec["batch"] * spec["seq"])
    same, aware = floor(*args), floor(*args, lora_aware=True, rank=RANK)
    lora_live, full_live = (live_bytes(jax_result[v]["memory"]) for v in ("jlora_lora", "jlora_full"))
    jax_result["floor"] = {"same_activations": same, "lora_aware": aware}
    mib = lambda x: f"{x / 2**20:.1f}"  # noqa: E731
    return [f"| activations, analytic (MiB) | {mib(same['activations_lora'])} | {mib(same['activations_full'])} | | |",
            f"| floor: state + activations (MiB) | {mib(same['lora'])} | {mib(same['full'])} | | |",
            f"| XLA live / floor | {lora_live / same['lora']:.3f} | {full_live / same['full']:.3f} | | |",
            f"| LoRA-aware floor (MiB), XLA live / it | {mib(aware['lora'])}, {lora_live / aware['lora']:.3f} | | | |"]


def add_mfu(spec: dict, jax_result: dict, torch_result: dict, dtype: str, device_kind: str) -> None:
    """Per variant: analytic model FLOPs and MFU; for the jlora steps also XLA's FLOPs and their MFU."""
    peak = peak_flops(device_kind, dtype)
    for name, r in (*((v, jax_result[v]) for v in VARIANTS[:2]), *((v, torch_result[v]) for v in VARIANTS[2:])):
        r["model_flops"] = model_flops_per_step(spec, name)
        r["mfu_analytic"] = mfu(r["model_flops"], r["step_s"], peak)
        if "xla_flops" in r:
            r["mfu_xla"] = mfu(r["xla_flops"], r["step_s"], peak)
    jax_result["peak_flops"] = peak


def mfu_rows(jax_result: dict, torch_result: dict, device_kind: str, dtype: str) -> list[str]:
    results = [jax_result[v] for v in VARIANTS[:2]] + [torch_result[v] for v in VARIANTS[2:]]
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    tf = lambda x: "" if x is None else f"{x / 1e12:.4g}"  # noqa: E731
    peak = jax_result["peak_flops"]
    gib = lambda b: "" if b is None else f"{b / 2**30:.2f}"  # noqa: E731
    return ["", f"MFU against {device_kind}'s dense {dtype} peak: "
            f"{'n/a (no peak known for this device/dtype)' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}",
            "(analytic: model FLOPs, no remat recomputation; XLA: what the compiled step does, remat included, "
            "a cuDNN attention call not counted)",
            "| FLOPs and MFU | jlora LoRA | jlora full | PEFT LoRA | torch full |", "| --- | --- | --- | --- | --- |",
            "| model TFLOP / step (analytic) | " + " | ".join(tf(r["model_flops"]) for r in results) + " |",
            "| MFU (analytic) | " + " | ".join(pct(r["mfu_analytic"]) for r in results) + " |",
            "| XLA cost-analysis TFLOP / step | " + " | ".join(tf(r.get("xla_flops")) for r in results) + " |",
            "| MFU (XLA FLOPs) | " + " | ".join(pct(r["mfu_xla"]) if "mfu_xla" in r else "" for r in results) + " |",
            "| device peak memory (GiB) | " + " | ".join(
                gib(r.get("device_peak_bytes", r.get("max_memory_allocated"))) for r in results) + " |"]


def table(workload: str, jax_result: dict, torch_result: dict, where: str, rss: dict | None = None,
          target: str = "c_attn", extra: list[str] | None = None, spec: dict | None = None,
          alternation: dict | None = None, machine: dict | None = None) -> str:
    j_lora, j_full = jax_result["jlora_lora"], jax_result["jlora_full"]
    p_lora, t_full = torch_result["peft_lora"], torch_result["torch_full"]
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    theory = state_bytes(jax_result["bytes"]["params"], jax_result["bytes"]["trainable"])
    lines = [*([machine_line(machine["info"]), f"load (/proc/loadavg) before: {machine['loadavg_before']}; "
                f"after: {machine['loadavg_after']}"] if machine else []),
             f"workload {workload}: {spec or WORKLOADS[workload]}, r={RANK} on {target}, {where}, "
             f"jax {jax.__version__}",
             "| train step | jlora LoRA | jlora full | PEFT LoRA | torch full |", "| --- | --- | --- | --- | --- |",
             f"| median step (s){', alternated' if alternation else ''} | {j_lora['step_s']:.3f} | "
             f"{j_full['step_s']:.3f} | {p_lora['step_s']:.3f} | {t_full['step_s']:.3f} |",
             *(alternation_rows(jax_result, torch_result, alternation) if alternation else []),
             f"| compile / first step (s) | {j_lora['compile_s']:.1f} | {j_full['compile_s']:.1f} | "
             f"{p_lora['first_step_s']:.2f} | {t_full['first_step_s']:.2f} |",
             f"| XLA live bytes (MiB) | {mib(live_bytes(j_lora['memory']))} | "
             f"{mib(live_bytes(j_full['memory']))} | | |",
             f"| XLA temp bytes (MiB) | {mib(j_lora['memory']['temp'])} | {mib(j_full['memory']['temp'])} | | |",
             f"| theoretical params+grads+adam (MiB) | {mib(theory['lora'])} | {mib(theory['full'])} | | |",
             *(extra or []),
             "",
             *(alternation_lines(alternation) if alternation else [
                 f"ratios: jlora-LoRA / PEFT-LoRA = {j_lora['step_s'] / p_lora['step_s']:.2f}; "
                 f"jlora-LoRA / jlora-full = {j_lora['step_s'] / j_full['step_s']:.2f}; "
                 f"PEFT-LoRA / torch-full = {p_lora['step_s'] / t_full['step_s']:.2f} (ratios of medians measured "
                 "one variant after the other, not alternated)"]),
             *(["", "| inference (jit forward, s) | base | merged | unmerged LoRA | merged / base | unmerged / base |",
                "| --- | --- | --- | --- | --- | --- |"] if jax_result.get("inference") else [])]
    for shape, r in jax_result.get("inference", {}).items():
        lines.append(f"| {shape} | {r['base_s']:.4f} | {r['merged_s']:.4f} | {r['unmerged_s']:.4f} | "
                     f"{r['merged_over_base']:.3f} | {r['unmerged_over_base']:.3f} |")
    if rss:
        lines += ["", "| peak RSS, own process (MiB) | imports only | jlora LoRA | jlora full | "
                  "PEFT LoRA | torch full |", "| --- | --- | --- | --- | --- | --- |",
                  "| | " + " | ".join(f"{rss[v]:.0f}" for v in ("none", *VARIANTS)) + " |"]
    b = jax_result["bytes"]
    lines += ["", f"checkpoint bytes: adapters {b['trainable']:,} vs full {b['params']:,} "
              f"({b['params'] / b['trainable']:.0f}x smaller)"]
    return "\n".join(lines)


PART_MARK = "compare_peft part result: "


def run_part(args: argparse.Namespace, spec: dict) -> None:
    """Child mode of the llama workloads: one side (``--part jax|torch``) in a process of its own, so
    that on a GPU each side has the whole device and its own CUDA libraries; prints its result as JSON."""
    gpu = args.device == "gpu"
    if args.part == "jax":
        device = jax.devices()[0]
        if gpu and device.platform != "gpu":
            raise SystemExit(f"--device gpu: JAX's first device is {device} (platform {device.platform!r}): "
                             "install jax with its CUDA plugin (jax[cuda13]) and leave JAX_PLATFORMS unset")
        result = measure_jax_llama(spec, args.steps, args.dtype, shapes=INFERENCE_SHAPES[args.workload],
                                   attention=args.attention, quantize=args.qlora)
        result["device_kind"] = device.device_kind
    else:
        import torch
        if gpu and not torch.cuda.is_available():
            raise SystemExit(f"--device gpu: torch {torch.__version__} sees no CUDA device (a CPU build of torch?)")
        result = measure_torch_llama(spec, args.steps, "cuda" if gpu else "cpu", args.dtype,
                                     threads=None if gpu else args.threads)
        result["device_kind"] = torch.cuda.get_device_name(0) if gpu else "cpu"
    result["machine"] = machine_info()  # this child's own thread settings
    print(PART_MARK + json.dumps(result))


def run_llama(args: argparse.Namespace, spec: dict) -> tuple[dict, dict, str, list[str]]:
    """torch, then JAX, each in a child process (:func:`run_part`); MFU fields; the table's header and rows."""
    import subprocess
    import sys
    results = {}
    for part in ("torch", "jax"):
        cmd = [sys.executable, __file__, "--part", part, "--workload", args.workload, "--device", args.device,
               "--dtype", args.dtype, "--steps", str(args.steps), "--threads", str(args.threads),
               "--attention", args.attention, "--remat" if spec["remat"] else "--no-remat",
               *(["--qlora", args.qlora] if args.qlora and part == "jax" else [])]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # stderr: passed through
        lines = [line for line in done.stdout.splitlines() if line.startswith(PART_MARK)]
        if done.returncode or not lines:
            raise SystemExit(f"the {part} part failed (exit {done.returncode}): {' '.join(cmd)}\n{done.stdout[-3000:]}")
        results[part] = json.loads(lines[-1][len(PART_MARK):])
    jax_result, torch_result = results["jax"], results["torch"]
    device_kind = jax_result["device_kind"]
    add_mfu(spec, jax_result, torch_result, args.dtype, device_kind)
    where = (device_kind if args.device == "gpu" else f"{args.threads} threads, "
             f"{platform.processor() or platform.machine()}") + \
        f", {args.dtype}, remat {spec['remat']}, JAX attention {jax_result['attention']}"
    return jax_result, torch_result, where, mfu_rows(jax_result, torch_result, device_kind, args.dtype) + \
        qlora_rows(spec, jax_result, args.qlora)


def qlora_rows(spec: dict, jax_result: dict, fmt: str | None) -> list[str]:
    """``--qlora``: the LoRA step over a quantized base (every projection) beside the LoRA step."""
    if not fmt:
        return []
    lora, qlora, peak = jax_result["jlora_lora"], jax_result["jlora_qlora"], jax_result.get("peak_flops")
    flops = model_flops_per_step(spec, "jlora_lora")  # the dequantization's elementwise work not counted
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    mib = lambda m: f"{(m['argument'] + m['temp']) / 2**20:.0f} ({m['argument'] / 2**20:.0f} + {m['temp'] / 2**20:.0f})"  # noqa: E731
    return ["", f"QLoRA: the same LoRA step over a {fmt} base (every projection quantized, dequantized one layer "
            "at a time in the forward and again in the backward)",
            "| | jlora LoRA | jlora QLoRA | QLoRA / LoRA |", "| --- | --- | --- | --- |",
            f"| median step (s) | {lora['step_s']:.3f} | {qlora['step_s']:.3f} | {qlora['step_s'] / lora['step_s']:.2f} |",
            f"| MFU (analytic model FLOPs) | {pct(mfu(flops, lora['step_s'], peak))} | "
            f"{pct(mfu(flops, qlora['step_s'], peak))} | |",
            f"| XLA arguments + temporaries (MiB) | {mib(lora['memory'])} | {mib(qlora['memory'])} | "
            f"{(qlora['memory']['argument'] + qlora['memory']['temp']) / (lora['memory']['argument'] + lora['memory']['temp']):.2f} |",
            "| device peak (GiB; cumulative in the process, the float base included) | "
            f"{(lora.get('device_peak_bytes') or 0) / 2**30:.2f} | {(qlora.get('device_peak_bytes') or 0) / 2**30:.2f} | |"]


ALTERNATION_ORDER = ("jlora_lora", "peft_lora", "jlora_full", "torch_full", "xla_matmul", "torch_matmul")
RATIOS = (("jlora_lora", "peft_lora"), ("jlora_lora", "jlora_full"), ("peft_lora", "torch_full"),
          ("jlora_full", "torch_full"), ("xla_matmul", "torch_matmul"))


def run_gpt2(args: argparse.Namespace, spec: dict) -> tuple[dict, dict, dict, list[str]]:
    """The GPT-2 workloads: inference timing, then the four train steps and the two matmul probes
    compiled / warmed up and timed in alternation in this process (:func:`timing.alternate`)."""
    hf_config = gpt2_config(spec, args.vocab)
    built = build_jax(hf_config, spec, args.loss, args.loss_chunk)
    jax_result: dict = {"bytes": built["bytes"]}
    shapes = INFERENCE_SHAPES[args.workload]
    if shapes and not args.no_inference:
        jax_result["inference"] = jax_inference(built, shapes, args.rounds)
    prepared = {**prepare_jax(built), **prepare_torch(hf_config, spec, args.threads)}
    probes, mm_flops = matmul_probes(args.matmul_n, args.threads)
    runs = {name: prepared[name][0] for name in VARIANTS}
    runs.update(probes)
    runs = {name: runs[name] for name in ALTERNATION_ORDER}
    wait = (lambda: wait_quiet(args.quiet_below, args.wait_quiet)) if args.wait_quiet > 0 else None
    alt = alternate(runs, args.rounds, args.steps, sample_load=CpuLoad().sample, before_round=wait)
    torch_result: dict = {}
    mm = {name: [mm_flops / t for t in round_medians(alt, name)] for name in probes}
    for name in VARIANTS:
        info = prepared[name][1]
        per_round = round_medians(alt, name)
        r = {**info, "first_step_s": alt["first_s"][name], "step_s": summary(per_round)["median"],
             "round_s": per_round, "step_s_min": min(per_round), "step_s_max": max(per_round)}
        (jax_result if name.startswith("jlora") else torch_result)[name] = r
    # one FLOP count per step kind for both frameworks: torch's matmul count (+ attention); XLA's beside it
    flops = {"jlora_lora": torch_result["peft_lora"]["matmul_flops"], "jlora_full": torch_result["torch_full"]["matmul_flops"]}
    flops.update(peft_lora=flops["jlora_lora"], torch_full=flops["jlora_full"])
    for name in VARIANTS:
        r = jax_result.get(name) or torch_result[name]
        probe = mm["xla_matmul" if name.startswith("jlora") else "torch_matmul"]
        r["step_flops"] = flops[name]
        r["flop_per_s"] = summary([flops[name] / t for t in r["round_s"]])
        r["of_matmul"] = summary([flops[name] / t / p for t, p in zip(r["round_s"], probe)])
    alternation = {"rounds": args.rounds, "steps_per_round": args.steps, "order_first_round": list(runs),
                   "times_s": alt["rounds"], "order": alt["order"], "load": alt["load"], "waited": alt["before"],
                   "ratios": {f"{a}/{b}": paired(alt, a, b) for a, b in RATIOS},
                   "matmul": {"n": args.matmul_n, "flops": mm_flops, **{k: summary(v) for k, v in mm.items()}}}
    other = [x["other_cores"] for x in alt["load"] if x]
    alternation["other_cores"] = summary(other) if other else None
    alternation["steal_cores"] = summary([x["steal_cores"] for x in alt["load"] if x]) if other else None
    # contention need not hit both frameworks alike (a 2-thread OpenMP loop waits for its slower thread,
    # XLA's pool steals work): the ratios again over the rounds in which other processes took little CPU
    quiet = [i for i, x in enumerate(alt["load"]) if x and x["other_cores"] < args.quiet_below]
    alternation["quiet_below_cores"] = args.quiet_below
    alternation["wait_quiet_s"] = args.wait_quiet
    alternation["quiet_rounds"] = quiet
    alternation["ratios_quiet"] = {key: summary([r["per_round"][i] for i in quiet])
                                   for key, r in alternation["ratios"].items()} if quiet else None
    for name in VARIANTS:  # step time, FLOP/s and share of the matmul probe over the quiet rounds
        r = jax_result.get(name) or torch_result[name]
        r["quiet"] = {"step_s": summary([r["round_s"][i] for i in quiet]),
                      "flop_per_s": summary([r["flop_per_s"]["per_round"][i] for i in quiet]),
                      "of_matmul": summary([r["of_matmul"]["per_round"][i] for i in quiet])} if quiet else None
    alternation["matmul"]["quiet"] = {k: summary([v[i] for i in quiet]) for k, v in mm.items()} if quiet else None
    extra = floor_rows(spec, args.vocab, jax_result)
    return jax_result, torch_result, alternation, extra


def alternation_rows(jax_result: dict, torch_result: dict, alternation: dict) -> list[str]:
    results = [jax_result[v] for v in VARIANTS[:2]] + [torch_result[v] for v in VARIANTS[2:]]
    mm = alternation["matmul"]
    g = lambda x: f"{x / 1e9:.1f}"  # noqa: E731
    return [
        f"| step (s): min–max of the {alternation['rounds']} round medians | "
        + " | ".join(f"{r['step_s_min']:.3f}–{r['step_s_max']:.3f}" for r in results) + " |",
        "| step GFLOP: matmuls (torch FlopCounterMode + attention) | " + " | ".join(
            g(r["step_flops"]) for r in results) + " |",
        "| step GFLOP: XLA cost analysis (plain loss, all ops) | " + " | ".join(
            g(r["xla_flops_plain_loss"]) if "xla_flops_plain_loss" in r else "" for r in results) + " |",
        "| GFLOP/s, median (min–max) | " + " | ".join(
            f"{r['flop_per_s']['median'] / 1e9:.0f} ({r['flop_per_s']['min'] / 1e9:.0f}–"
            f"{r['flop_per_s']['max'] / 1e9:.0f})" for r in results) + " |",
        f"| share of one {mm['n']}² fp32 matmul's FLOP/s (XLA for jlora, torch for PEFT/torch) | " + " | ".join(
            spread(r["of_matmul"]) for r in results) + " |",
        *([f"| quiet rounds ({len(alternation['quiet_rounds'])}): median step (s) | " + " | ".join(
            f"{r['quiet']['step_s']['median']:.3f}" for r in results) + " |",
           "| quiet rounds: GFLOP/s | " + " | ".join(f"{r['quiet']['flop_per_s']['median'] / 1e9:.0f}" for r in results)
           + " |",
           "| quiet rounds: share of the matmul's FLOP/s | " + " | ".join(spread(r["quiet"]["of_matmul"]) for r in results)
           + " |"] if alternation["quiet_rounds"] else [])]


def alternation_lines(alternation: dict) -> list[str]:
    rt, mm, n = alternation["ratios"], alternation["matmul"], alternation["rounds"]
    per = lambda key: " ".join(f"{x:.2f}" for x in rt[key]["per_round"])  # noqa: E731
    other, steal, quiet = alternation["other_cores"], alternation["steal_cores"], alternation["ratios_quiet"]
    return [
        f"ratios: jlora-LoRA / PEFT-LoRA = {spread(rt['jlora_lora/peft_lora'])}; "
        f"jlora-LoRA / jlora-full = {spread(rt['jlora_lora/jlora_full'])}; "
        f"PEFT-LoRA / torch-full = {spread(rt['peft_lora/torch_full'])}; "
        f"jlora-full / torch-full = {spread(rt['jlora_full/torch_full'])}",
        f"  (median (min–max) of per-round ratios over {n} rounds; each round times {alternation['steps_per_round']} "
        f"steps of each variant and of each matmul in turn, order rotated each round; a round's value is the "
        f"median of its steps)",
        f"  per round, jlora-LoRA / PEFT-LoRA: {per('jlora_lora/peft_lora')}; jlora-LoRA / jlora-full: "
        f"{per('jlora_lora/jlora_full')}",
        f"one {mm['n']}x{mm['n']} @ {mm['n']}x{mm['n']} fp32 matmul, GFLOP/s median (min–max): "
        f"XLA {mm['xla_matmul']['median'] / 1e9:.0f} ({mm['xla_matmul']['min'] / 1e9:.0f}–"
        f"{mm['xla_matmul']['max'] / 1e9:.0f}), torch {mm['torch_matmul']['median'] / 1e9:.0f} "
        f"({mm['torch_matmul']['min'] / 1e9:.0f}–{mm['torch_matmul']['max'] / 1e9:.0f}); "
        f"time XLA / torch per round {spread(rt['xla_matmul/torch_matmul'])}",
        "other processes' CPU during the rounds (cores, from /proc/stat): " + (
            f"median {other['median']:.2f} (min–max {other['min']:.2f}–{other['max']:.2f}), steal "
            f"{steal['median']:.2f}; per round: " + " ".join(f"{x:.2f}" for x in other["per_round"])
            if other else "n/a"),
        *([f"waited for a quiet machine before each round (up to {alternation['wait_quiet_s']:.0f} s): "
           + " ".join(f"{w['waited_s']:.0f}s{'' if w['quiet'] else '(not quiet)'}" for w in alternation["waited"])]
          if alternation["waited"] else []),
        f"quiet rounds (other processes < {alternation['quiet_below_cores']} cores): "
        + (f"{len(alternation['quiet_rounds'])} of {n}; jlora-LoRA / PEFT-LoRA = "
           f"{spread(quiet['jlora_lora/peft_lora'])}, jlora-LoRA / jlora-full = "
           f"{spread(quiet['jlora_lora/jlora_full'])}, PEFT-LoRA / torch-full = {spread(quiet['peft_lora/torch_full'])}, "
           f"jlora-full / torch-full = {spread(quiet['jlora_full/torch_full'])}; matmul GFLOP/s XLA "
           f"{mm['quiet']['xla_matmul']['median'] / 1e9:.0f}, torch {mm['quiet']['torch_matmul']['median'] / 1e9:.0f}"
           if quiet else "none")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), help="default: W1 on cpu, llama-1b on gpu")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                        help="llama workloads: params and activations (default: float32 on cpu, bfloat16 on gpu)")
    parser.add_argument("--attention", choices=("auto", "xla", "cudnn"), default="auto",
                        help="JAX attention of the llama workloads (auto: cuDNN on a GPU in bf16 if it runs)")
    parser.add_argument("--remat", action=argparse.BooleanOptionalAction,
                        help="llama workloads: per-layer remat / gradient checkpointing (default: the workload's)")
    parser.add_argument("--steps", type=int, default=3,
                        help="GPT-2 workloads: timed steps of each variant per round; llama workloads: timed steps")
    parser.add_argument("--rounds", type=int, default=7,
                        help="GPT-2 workloads: rounds of alternation (and the least rounds of the inference timing)")
    parser.add_argument("--matmul-n", type=int, default=2048,
                        help="size of the fp32 matmul (n x n @ n x n) timed in XLA and torch as the practical FLOP/s limit")
    parser.add_argument("--quiet-below", type=float, default=0.25,
                        help="ratios also over the rounds in which other processes took fewer cores than this")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each round, wait up to this long for other processes to take fewer than "
                             "--quiet-below cores (over 1 s); 0: do not wait")
    parser.add_argument("--no-inference", action="store_true", help="GPT-2 workloads: skip the inference timing")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=50257, help="GPT-2 workloads only")
    parser.add_argument("--loss", choices=("fused", "plain"), default="fused",
                        help="GPT-2 workloads, jlora side: jlora.lm_head_cross_entropy or optax on sliced logits")
    parser.add_argument("--loss-chunk", type=int, default=1024, help="chunk_size (vocab columns) of the fused loss")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--qlora", choices=("nf4", "int8"), default=None,
                        help="llama workloads: also the LoRA step over a quantized base (QLoRA; jax side)")
    parser.add_argument("--rss", action="store_true", help="also peak RSS of each variant in its own process (cpu)")
    parser.add_argument("--only", choices=("none", *VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--part", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    gpu = args.device == "gpu"
    args.workload = args.workload or ("llama-1b" if gpu else "W1")
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    llama = args.workload in LLAMA_WORKLOADS
    if not llama and (gpu or args.dtype != "float32"):
        parser.error("--device gpu and --dtype bfloat16 run the llama workloads only (the GPT-2 ones use "
                     "transformers' Flax GPT-2, which transformers 5 removed)")
    if gpu and args.rss:
        parser.error("--rss measures host RSS of CPU runs; it is not available with --device gpu")
    spec = dict(WORKLOADS[args.workload])
    if llama and args.remat is not None:
        spec["remat"] = args.remat
    if args.only:
        return run_only(args, spec)
    if args.part:
        return run_part(args, spec)
    load_before = loadavg()
    alternation = None
    if llama:
        jax_result, torch_result, where, extra = run_llama(args, spec)
    else:
        jax_result, torch_result, alternation, extra = run_gpt2(args, spec)
        where = f"{args.threads} torch threads, {platform.processor() or platform.machine()}, jlora loss {args.loss}" + \
            (f" (chunk {args.loss_chunk})" if args.loss == "fused" else "")
    rss = measure_rss(args) if args.rss else None
    machine = {"info": machine_info(), "loadavg_before": load_before, "loadavg_after": loadavg()}
    if llama:  # the steps ran in child processes: their thread settings, not this process's
        for part, r in (("torch", torch_result), ("jax", jax_result)):
            machine["info"]["threads"][part] = r.get("machine", {}).get("threads", {}).get(part)
    report = table(args.workload, jax_result, torch_result, where, rss,
                   "q_proj, v_proj" if llama else "c_attn", extra, spec, alternation, machine)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_plain" if not llama and args.loss == "plain" else ""
    (args.out / f"compare_peft_{args.workload}{suffix}.json").write_text(json.dumps(
        {"workload": args.workload, "spec": spec, "device": args.device, "dtype": args.dtype,
         "loss": None if llama else args.loss, "machine": machine, "jax": jax_result, "torch": torch_result,
         "alternation": alternation, "peak_rss_mib": rss, "table": report},
        indent=2))


if __name__ == "__main__":
    main()
