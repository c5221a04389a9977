"""compare_peft.py's llama workloads (llama-1b, llama-tiny): torch, then JAX, each in a child process of its own.

Run through ``compare_peft.py --workload llama-1b|llama-tiny [--device gpu]``; the children are
``compare_peft.py --part jax|torch`` (the whole device each; no torch/JAX CUDA-library or allocator
interplay), both in the interpreter compare_peft.py runs in (it needs jax and torch). Steps are timed
one side after the other (median of ``--steps`` after warm-up), not alternated; MFU rows against the
device's dense peak; ``--qlora``: the LoRA step over a quantized base (JAX side); ``--rss`` (CPU): the
peak RSS of each variant in a child process of its own.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import jax

from llama_workload import (LLAMA_INFERENCE_SHAPES, LLAMA_WORKLOADS, measure_jax_llama, measure_torch_llama, mfu,
                            model_flops_per_step, peak_flops)
from machine import machine_info, machine_line
from memory_theory import live_bytes, state_bytes

RANK = 8
VARIANTS = ("jlora_lora", "jlora_full", "peft_lora", "torch_full")
PART_MARK = "compare_peft part result: "
SCRIPT = str(Path(__file__).resolve().parent / "compare_peft.py")


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
    rss = {}
    for variant in ("none", *VARIANTS):
        done = subprocess.run([sys.executable, SCRIPT, "--workload", args.workload, "--vocab", str(args.vocab),
                               "--threads", str(args.threads), "--steps", "3", "--dtype", args.dtype,
                               "--loss", args.loss, "--loss-chunk", str(args.loss_chunk), "--only",
                               variant, *([] if args.remat is None else ["--remat" if args.remat else "--no-remat"])],
                              capture_output=True, text=True, check=True)
        rss[variant] = json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mib"]
    return rss


def run_only(args: argparse.Namespace, spec: dict) -> None:
    """Child mode of ``--rss``: run one variant's steps and print its peak RSS as JSON."""
    if args.only in ("jlora_lora", "jlora_full"):
        measure_jax_llama(spec, args.steps, args.dtype, variants=(args.only,))
    elif args.only in ("peft_lora", "torch_full"):
        measure_torch_llama(spec, args.steps, "cpu", args.dtype, variants=(args.only,), threads=args.threads)
    print(json.dumps({"variant": args.only, "peak_rss_mib": peak_rss_mib()}))


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
          target: str = "q_proj, v_proj", extra: list[str] | None = None, spec: dict | None = None,
          machine: dict | None = None) -> str:
    j_lora, j_full = jax_result["jlora_lora"], jax_result["jlora_full"]
    p_lora, t_full = torch_result["peft_lora"], torch_result["torch_full"]
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    theory = state_bytes(jax_result["bytes"]["params"], jax_result["bytes"]["trainable"])
    lines = [*([machine_line(machine["info"]), f"load (/proc/loadavg) before: {machine['loadavg_before']}; "
                f"after: {machine['loadavg_after']}"] if machine else []),
             f"workload {workload}: {spec or LLAMA_WORKLOADS[workload]}, r={RANK} on {target}, {where}, "
             f"jax {jax.__version__}",
             "| train step | jlora LoRA | jlora full | PEFT LoRA | torch full |", "| --- | --- | --- | --- | --- |",
             f"| median step (s) | {j_lora['step_s']:.3f} | "
             f"{j_full['step_s']:.3f} | {p_lora['step_s']:.3f} | {t_full['step_s']:.3f} |",
             f"| compile / first step (s) | {j_lora['compile_s']:.1f} | {j_full['compile_s']:.1f} | "
             f"{p_lora['first_step_s']:.2f} | {t_full['first_step_s']:.2f} |",
             f"| XLA live bytes (MiB) | {mib(live_bytes(j_lora['memory']))} | "
             f"{mib(live_bytes(j_full['memory']))} | | |",
             f"| XLA temp bytes (MiB) | {mib(j_lora['memory']['temp'])} | {mib(j_full['memory']['temp'])} | | |",
             f"| theoretical params+grads+adam (MiB) | {mib(theory['lora'])} | {mib(theory['full'])} | | |",
             *(extra or []),
             "",
             f"ratios: jlora-LoRA / PEFT-LoRA = {j_lora['step_s'] / p_lora['step_s']:.2f}; "
             f"jlora-LoRA / jlora-full = {j_lora['step_s'] / j_full['step_s']:.2f}; "
             f"PEFT-LoRA / torch-full = {p_lora['step_s'] / t_full['step_s']:.2f} (ratios of medians measured "
             "one variant after the other, not alternated)",
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


def run_part(args: argparse.Namespace, spec: dict) -> None:
    """Child mode of the llama workloads: one side (``--part jax|torch``) in a process of its own, so
    that on a GPU each side has the whole device and its own CUDA libraries; prints its result as JSON."""
    gpu = args.device == "gpu"
    if args.part == "jax":
        device = jax.devices()[0]
        if gpu and device.platform != "gpu":
            raise SystemExit(f"--device gpu: JAX's first device is {device} (platform {device.platform!r}): "
                             "install jax with its CUDA plugin (jax[cuda13]) and leave JAX_PLATFORMS unset")
        result = measure_jax_llama(spec, args.steps, args.dtype, shapes=LLAMA_INFERENCE_SHAPES[args.workload],
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
    results = {}
    for part in ("torch", "jax"):
        cmd = [sys.executable, SCRIPT, "--part", part, "--workload", args.workload, "--device", args.device,
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


def main_llama(args: argparse.Namespace, spec: dict) -> None:
    """The llama workloads end to end: both parts, the table, ``<out>/compare_peft_<workload>.json``."""
    from machine import loadavg
    load_before = loadavg()
    jax_result, torch_result, where, extra = run_llama(args, spec)
    rss = measure_rss(args) if args.rss else None
    machine = {"info": machine_info(), "loadavg_before": load_before, "loadavg_after": loadavg()}
    for part, r in (("torch", torch_result), ("jax", jax_result)):  # the children's thread settings
        machine["info"]["threads"][part] = r.get("machine", {}).get("threads", {}).get(part)
    report = table(args.workload, jax_result, torch_result, where, rss, extra=extra, spec=spec, machine=machine)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"compare_peft_{args.workload}.json").write_text(json.dumps(
        {"workload": args.workload, "spec": spec, "device": args.device, "dtype": args.dtype, "machine": machine,
         "jax": jax_result, "torch": torch_result, "peak_rss_mib": rss, "table": report}, indent=2))
