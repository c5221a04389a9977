"""Where a compiled XLA:CPU step spends its time: per-op wall time from a ``jax.profiler`` trace,
joined with the optimized HLO (opcode, shapes, FLOPs of every dot), summed per op class.

    trace = trace_ops(run, steps=3)              # {op name: seconds per step, calls per step}
    ops = hlo_ops(compiled.as_text())            # {op name: HloOp(opcode, kind, flops, shape, source)}
    table = breakdown(trace, ops)                # per class: ms per step, share, GFLOP, GFLOP/s

XLA:CPU (thunk runtime, jaxlib >= 0.4.32) emits one trace event per executed thunk, named after its
HLO instruction; ops inside a ``while`` body (a ``scan``/``map``) are listed once per iteration.
Classes: ``matmul`` (dot / convolution, also custom matmul fusions), ``elementwise+reduce`` (loop,
input and YNNPACK fusions that hold no dot), ``copy/transpose`` (copies, transposes, bitcast-converts
that move data), ``collective/other``.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import math
import re
import tempfile
from typing import Any, Callable

import jax

_DEF = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\(?[a-z0-9]+\[[^=]*?\]|\([^=]*?\)|[a-z0-9]+\[\])"
                  r"(?:\{[^}]*\})?\s+([a-z\-]+)\((.*)")
_SHAPE = re.compile(r"([a-z]+\d*)\[([0-9,]*)\]")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


@dataclasses.dataclass
class HloOp:
    name: str
    opcode: str
    shape: tuple[int, ...]
    dtype: str
    flops: float
    kind: str
    source: str  # the jax op_name metadata: which jax-level op this came from


def _dims(text: str) -> tuple[str, tuple[int, ...]]:
    match = _SHAPE.search(text)
    if not match:
        return "", ()
    return match.group(1), tuple(int(d) for d in match.group(2).split(",") if d)


def _dot_flops(rest: str, out: tuple[int, ...], shapes: dict[str, tuple[int, ...]]) -> float:
    operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
    contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", rest)
    if not operands or contracting is None or operands[0] not in shapes:
        return 0.0
    lhs = shapes[operands[0]]
    k = math.prod(lhs[int(d)] for d in contracting.group(1).split(",") if d)
    return 2.0 * math.prod(out) * k


def hlo_ops(text: str) -> dict[str, HloOp]:
    """Every instruction of an optimized HLO module (``compiled.as_text()``) by name, with its opcode,
    output shape, FLOPs (dots: ``2 * |out| * |contracted|``; a fusion: the sum of the dots it calls)
    and class."""
    shapes: dict[str, tuple[int, ...]] = {}
    rows: list[tuple[str, str, str, tuple[int, ...], str, str]] = []  # name, opcode, dtype, shape, rest, computation
    computation = ""
    for line in text.splitlines():
        if line[:1] not in (" ", "") and line.rstrip().endswith("{"):  # a computation's header (not indented)
            comp = _COMP.match(line)
            computation = comp.group(1) if comp else line
            continue
        match = _DEF.match(line)
        if not match:
            continue
        name, type_text, opcode, rest = match.groups()
        dtype, shape = _dims(type_text)
        shapes[name] = shape
        rows.append((name, opcode, dtype, shape, rest, computation))
    flops_in: dict[str, float] = collections.defaultdict(float)
    dots_in: set[str] = set()
    ops: dict[str, HloOp] = {}
    for name, opcode, dtype, shape, rest, computation in rows:
        flops = _dot_flops(rest, shape, shapes) if opcode in ("dot", "convolution") else 0.0
        if flops:
            flops_in[computation] += flops
            dots_in.add(computation)
        source = re.search(r'op_name="([^"]*)"', rest)
        ops[name] = HloOp(name, opcode, shape, dtype, flops, "", source.group(1) if source else "")
    for name, opcode, dtype, shape, rest, computation in rows:
        op = ops[name]
        called = re.search(r"calls=%?([\w.\-]+)", rest)
        if opcode == "fusion" and called:
            op.flops = flops_in.get(called.group(1), 0.0)
        op.kind = _kind(op, called is not None and called.group(1) in dots_in)
    return ops


def _kind(op: HloOp, fused_dot: bool) -> str:
    if op.opcode in ("dot", "convolution") or fused_dot or op.flops:
        return "matmul"
    if op.opcode in ("copy", "transpose", "copy-start", "copy-done", "bitcast-convert", "dynamic-update-slice",
                     "concatenate", "pad", "slice", "dynamic-slice"):
        return "copy/transpose"
    if op.opcode == "fusion" or op.opcode in ("add", "multiply", "subtract", "divide", "exponential", "reduce",
                                              "select", "compare", "maximum", "convert", "broadcast", "rsqrt",
                                              "tanh", "log", "negate", "sqrt", "power", "scatter", "gather"):
        return "elementwise+reduce"
    return "collective/other"


def trace_ops(run: Callable[[], Any], steps: int = 3) -> dict[str, tuple[float, float]]:
    """``{op name: (seconds per step, calls per step)}`` of ``run()`` (one compiled step, already
    warmed up), from a ``jax.profiler`` trace of ``steps`` calls."""
    with tempfile.TemporaryDirectory() as folder:
        jax.block_until_ready(run())
        jax.profiler.start_trace(folder, create_perfetto_trace=True)
        for _ in range(steps):
            jax.block_until_ready(run())
        jax.profiler.stop_trace()
        files = glob.glob(f"{folder}/**/perfetto_trace.json.gz", recursive=True)
        if not files:
            raise RuntimeError("jax.profiler wrote no perfetto trace")
        with gzip.open(files[0]) as f:
            data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    total: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.defaultdict(int)
    for event in events:
        if event.get("ph") == "X" and "dur" in event:
            total[event["name"]] += event["dur"] * 1e-6
            calls[event["name"]] += 1
    return {name: (total[name] / steps, calls[name] / steps) for name in total}


def breakdown(trace: dict[str, tuple[float, float]], ops: dict[str, HloOp],
              step_seconds: float | None = None) -> dict[str, Any]:
    """Per op class: seconds per step, share of the step, GFLOP and GFLOP/s; plus the ops themselves
    (``top``: the 25 costliest, with their jax source op). Trace events that are not HLO ops (the
    executor's own spans, python) are left out; ``step_seconds`` (default: the executor's span)
    is the denominator of the shares."""
    if step_seconds is None:
        step_seconds = max((s for name, (s, _) in trace.items() if name.startswith("ThunkExecutor::Execute (wait")),
                           default=sum(s for name, (s, _) in trace.items() if name in ops))
    classes: dict[str, dict[str, float]] = {}
    rows = []
    for name, (seconds, calls) in trace.items():
        op = ops.get(name)
        if op is None:
            continue
        flops = op.flops * calls
        entry = classes.setdefault(op.kind, {"seconds": 0.0, "flops": 0.0, "ops": 0})
        entry["seconds"] += seconds
        entry["flops"] += flops
        entry["ops"] += 1
        rows.append({"op": name, "kind": op.kind, "ms": seconds * 1e3, "calls": calls, "shape": list(op.shape),
                     "gflop": flops / 1e9, "gflops_per_s": flops / seconds / 1e9 if seconds and flops else None,
                     "source": op.source})
    for entry in classes.values():
        entry["share"] = entry["seconds"] / step_seconds
        entry["gflops_per_s"] = entry["flops"] / entry["seconds"] / 1e9 if entry["seconds"] else 0.0
    rows.sort(key=lambda r: -r["ms"])
    covered = sum(e["seconds"] for e in classes.values())
    return {"step_s": step_seconds, "ops_s": covered, "classes": classes, "top": rows[:25], "all": rows}


def by_source(table: dict[str, Any], patterns: dict[str, str]) -> dict[str, dict[str, float]]:
    """Seconds and GFLOP per step of the ops whose jax source matches each regex of ``patterns``
    (e.g. ``{"attention": "attn/(?!c_)", "lm head + loss": "while|nd,vd"}``), first match wins."""
    out = {label: {"ms": 0.0, "gflop": 0.0} for label in [*patterns, "rest"]}
    for row in table["all"]:
        label = next((k for k, rx in patterns.items() if re.search(rx, row["source"] or row["op"])), "rest")
        out[label]["ms"] += row["ms"]
        out[label]["gflop"] += row["gflop"]
    return out
