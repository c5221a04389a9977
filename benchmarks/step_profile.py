"""Where the CLI's train step spends its time, in float32 and bfloat16: the op-class table of
``op_profile.py`` (matmul / elementwise+reduce / copy/transpose / other) per dtype, plus what a
bf16 step still does outside bf16: the matmul time and FLOPs by the dtype of their operands, the
converts, the transposes and copies, and the time by jax source (attention, LM head + loss, the
LoRA path, norms, the optimizer).

    python benchmarks/step_profile.py [--workload sft|main] [--dtype float32,bfloat16] [--steps 3]
                                      [--tiny] [--out DIR]

The steps are the CLI's own (``jlora_worker.build_sft`` / ``build_main``: the SFT step of
``jlora finetune --task causal-lm`` on SmolLM2-135M, 4 x 384 packed tokens; the main job's step on
MiniLM, 16 x 128), compiled once, warmed up, then traced for ``--steps`` steps with
``jax.profiler`` (XLA:CPU emits one event per thunk). The bf16 matmul's practical rate (a 2048^3
``jnp.dot`` in the same process) is printed beside each dtype's matmul class, so the step's
matmul GFLOP/s reads as a fraction of it. Writes ``<out>/step_profile_<workload>.json``.
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jlora_worker
import op_profile
from machine import machine_info, machine_line

SOURCES = {  # first match wins, on the jax op_name of each op
    "LoRA path": r"lora|dense_delta|low_rank",
    "attention": r"attn|attention|softmax|dot_product",
    "LM head + loss": r"lm_head|cross_entropy|_fused|logsumexp|while",
    "optimizer": r"adam|optax|update|scale_by",
    "norms": r"norm|rsqrt|layer_norm|LayerNorm",
    "mlp": r"mlp|gate_proj|up_proj|down_proj|intermediate|output/dense",
}
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\(?([a-z0-9]+)\[[^=]*?\s([a-z\-]+)\((.*)")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def dot_operand_dtypes(text: str) -> dict[str, str]:
    """``{computation or op name: "lhs x rhs -> out"}`` for every dot of an optimized HLO module: the
    dtypes its operands arrive in (a fusion holding a dot is keyed by its fused computation; the
    operands' dtypes are read off their definitions, since the text names them untyped)."""
    dtype_of: dict[str, str] = {}
    dots: list[tuple[str, str, str, str]] = []  # name, computation, out dtype, operand text
    computation = ""
    for line in text.splitlines():
        if line[:1] not in (" ", "") and line.rstrip().endswith("{"):
            match = _COMP.match(line)
            computation = match.group(1) if match else line
            continue
        match = _DEF.match(line)
        if not match:
            continue
        name, dtype, opcode, rest = match.groups()
        dtype_of[name] = dtype
        if opcode in ("dot", "convolution"):
            dots.append((name, computation, dtype, rest))
    found: dict[str, str] = {}
    for name, computation, out, rest in dots:
        operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])[:2]
        key = " x ".join(dtype_of.get(o, "?") for o in operands) + f" -> {out}"
        found[name] = found.setdefault(computation, key)
    return found


def fusion_calls(text: str) -> dict[str, str]:
    """``{fusion op name: the computation it calls}``."""
    calls = {}
    for line in text.splitlines():
        match = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*\bfusion\(.*calls=%?([\w.\-]+)", line)
        if match:
            calls[match.group(1)] = match.group(2)
    return calls


def matmul_rate(dtype: str, n: int = 2048, repeats: int = 5) -> float:
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(f(a, a))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(a, a))
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def profile(workload: str, dtype: str, steps: int, tiny: bool, folder: str) -> dict[str, Any]:
    captured: list[Any] = []
    compile_lowered = jlora_worker.compile_lowered

    def keep(lowered: Any) -> tuple[Any, dict]:  # the compiled step, for its HLO text
        compiled, info = compile_lowered(lowered)
        captured.append(compiled)
        return compiled, info

    jlora_worker.compile_lowered = keep
    try:
        built = (jlora_worker.build_sft if workload == "sft" else jlora_worker.build_main)(dtype, folder, tiny=tiny)
    finally:
        jlora_worker.compile_lowered = compile_lowered
    if "unsupported" in built:
        raise SystemExit(built["unsupported"])
    (name, info), = built["runs"].items()
    run, text = jlora_worker.RUNS[name], captured[0].as_text()
    for _ in range(2):
        jax.block_until_ready(run())
    start = time.perf_counter()
    for _ in range(steps):
        jax.block_until_ready(run())
    step_s = (time.perf_counter() - start) / steps
    table = op_profile.breakdown(op_profile.trace_ops(run, steps), op_profile.hlo_ops(text))
    dots, calls = dot_operand_dtypes(text), fusion_calls(text)
    by_dtype: dict[str, dict[str, float]] = collections.defaultdict(lambda: {"ms": 0.0, "gflop": 0.0})
    converts = {"ms": 0.0, "ops": 0}
    where: dict[str, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))

    def short(source: str) -> str:  # the jax op path without the layer index and the jit/transpose wrappers
        return re.sub(r"/\d+/", "/N/", re.sub(r"^jit\(step\)/|transpose\(|jvp\(|\)", "", source or "?"))[-90:]

    for row in table["all"]:
        if row["kind"] == "matmul":
            key = dots.get(row["op"]) or dots.get(calls.get(row["op"], ""), "unknown")
            by_dtype[key]["ms"] += row["ms"]
            by_dtype[key]["gflop"] += row["gflop"]
            if key.startswith("f32 x f32"):
                where["f32 matmul"][short(row["source"])] += row["ms"]
        if "convert" in row["op"]:
            converts["ms"] += row["ms"]
            converts["ops"] += 1
            where["convert"][short(row["source"])] += row["ms"]
    return {"workload": built["workload"], "dtype": dtype, "step_s": step_s, "memory": info.get("memory"),
            "dtypes": info.get("dtypes"), "classes": table["classes"], "traced_step_s": table["step_s"],
            "matmul_by_operand_dtype": dict(by_dtype), "converts": converts,
            "where": {k: dict(sorted(v.items(), key=lambda kv: -kv[1])[:8]) for k, v in where.items()},
            "by_source": op_profile.by_source(table, SOURCES),
            "top": [{k: r[k] for k in ("op", "kind", "ms", "gflop", "shape", "source")} for r in table["top"][:12]]}


def report(result: dict[str, Any], rates: dict[str, float]) -> list[str]:
    lines = [f"### {result['dtype']}: step {result['step_s']:.3f} s (traced {result['traced_step_s']:.3f} s)", "",
             "| op class | ms / step | share | GFLOP | GFLOP/s |", "|---|---|---|---|---|"]
    for kind, c in sorted(result["classes"].items(), key=lambda kv: -kv[1]["seconds"]):
        lines.append(f"| {kind} | {c['seconds'] * 1e3:.0f} | {c['share']:.0%} | {c['flops'] / 1e9:.1f} | "
                     f"{c['gflops_per_s']:.0f} |")
    lines += ["", f"matmuls by operand dtype (the {result['dtype']} 2048^3 matmul here: "
                  f"{rates[result['dtype']]:.0f} GFLOP/s):", "",
              "| operands | ms / step | GFLOP | GFLOP/s | of the large matmul |", "|---|---|---|---|---|"]
    for key, v in sorted(result["matmul_by_operand_dtype"].items(), key=lambda kv: -kv[1]["ms"]):
        rate = v["gflop"] / v["ms"] * 1e3 if v["ms"] else 0.0
        lines.append(f"| {key} | {v['ms']:.0f} | {v['gflop']:.1f} | {rate:.0f} | {rate / rates[result['dtype']]:.0%} |")
    lines += ["", f"converts: {result['converts']['ops']} ops, {result['converts']['ms']:.0f} ms / step", ""]
    for what, sources in result["where"].items():
        lines += [f"costliest {what} ops by jax source (ms / step):"] + \
            [f"- {ms:.0f}: {source}" for source, ms in sources.items()] + [""]
    lines += ["",
              "| jax source | ms / step | GFLOP |", "|---|---|---|"]
    for label, v in result["by_source"].items():
        lines.append(f"| {label} | {v['ms']:.0f} | {v['gflop']:.1f} |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=("sft", "main"), default="sft")
    parser.add_argument("--dtype", default="float32,bfloat16")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a random 2-layer model (smoke test)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    dtypes = [d for d in args.dtype.split(",") if d]
    for dtype in dtypes:
        if dtype not in ("float32", "bfloat16"):
            parser.error(f"--dtype: expected float32 and/or bfloat16 (comma-separated), got {dtype!r}")
    info = machine_info()
    rates = {d: matmul_rate(d, n=512 if args.tiny else 2048) for d in ("float32", "bfloat16")}
    lines = [f"# step profile: {args.workload}", "", machine_line(info),
             f"large matmul here: float32 {rates['float32']:.0f} GFLOP/s, bfloat16 {rates['bfloat16']:.0f} GFLOP/s", ""]
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for dtype in dtypes:
            results[dtype] = profile(args.workload, dtype, args.steps, args.tiny, folder)
            lines += report(results[dtype], rates)
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"step_profile_{args.workload}.json").write_text(
        json.dumps({"machine": info, "matmul_gflops": rates, "results": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
