"""jlora's step against PEFT's, each side in its own interpreter, alternated by this driver: the common part.

main_job_step.py, sft_step.py and compare_peft.py (GPT-2 workloads) run the same way:

1. two workers start (workers.py): jlora_worker.py in ``--jlora-python`` (default: this interpreter)
   and peft_worker.py in ``--peft-python`` (default ``.venv-peft/bin/python``, made by
   ``benchmarks/setup-peft.sh``: Python 3.11, torch 2.13 CPU, transformers 5, peft; no jax);
2. per dtype of ``--dtype`` (float32, bfloat16 or both) the jlora worker builds its step (the CLI's own
   functions with the CLI option ``dtype``) and writes the model, batch and initial ``lora_a`` it used;
   the PEFT worker builds the same step from those files: in float32, and in bfloat16 twice (the base in
   bf16 weights, and torch.autocast over the float32 model), "PEFT bf16" being the faster of the two by
   median step; trainable counts must be equal and the losses at the initial adapter equal within
   ``rtol`` (float32) or :data:`BF16_RTOL` (bfloat16), else the run stops;
3. each side also builds an ``--matmul-n`` cube matmul per dtype (its framework's practical FLOP/s);
4. :func:`workers.alternate` times every run in turns: ``--rounds`` rounds of ``--steps`` calls each,
   the order rotated each round, ``--pause`` s of sleep before each turn; per round the CPU that other
   processes took (all but the driver and its two workers), and before each round ``--wait-quiet``;
5. reported: per run median step and min-max of the round medians, the step FLOPs (torch's count, the
   same for both frameworks, less what jlora's step skips: ``flops_delta``, the SFT head applied at the
   target positions only) per second and as a share of the same side's same-dtype matmul in the same
   round; per-round ratios jlora / PEFT in each dtype (median, min-max, over all and over the quiet
   rounds), bf16 / fp32 on each side, XLA / torch matmul; memory (XLA's compiled memory analysis;
   torch's live tensors in one step); each worker's machine line (CPU model, flags, threads, versions).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

from machine import CpuLoad, loadavg, machine_info, machine_line, md_row, wait_quiet
from timing import paired, round_medians, spread, summary
from workers import ROOT, Worker, alternate, python_of

BF16_RTOL = 3e-2  # initial losses in bfloat16: two frameworks round differently
DTYPES = ("float32", "bfloat16")


def add_arguments(parser: argparse.ArgumentParser, rounds: int, steps: int) -> None:
    add = parser.add_argument
    add("--dtype", choices=("float32", "bfloat16", "both"), default="both", help="the steps' dtype(s)")
    add("--rounds", type=int, default=rounds, help="rounds of alternation")
    add("--steps", type=int, default=steps, help="timed steps of each run per round")
    add("--pause", type=float, default=1.0, metavar="SECONDS",
        help="sleep before each turn, so the threads of the side that just ran are idle again")
    add("--threads", type=int, default=2, help="torch threads (PEFT steps and the torch matmul)")
    add("--matmul-n", type=int, help="size of the matmul probes (default 2048; 256 with --tiny)")
    add("--quiet-below", type=float, default=0.25,
        help="ratios also over the rounds in which other processes took fewer cores than this")
    add("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
        help="before each round, wait up to this long for a quiet machine (0: do not wait)")
    add("--jlora-python", default=None, help="interpreter of the jlora side (default: this one)")
    add("--peft-python", default=str(ROOT / ".venv-peft" / "bin" / "python"),
        help="interpreter of the PEFT side: torch, transformers, peft (bash benchmarks/setup-peft.sh)")
    add("--out", type=Path, default=Path("benchmarks/results"))


def dtypes_of(args: argparse.Namespace) -> list[str]:
    return list(DTYPES) if args.dtype == "both" else [args.dtype]


def parts(name: str) -> tuple[str, str]:
    """``"peft_lora:bfloat16-weights"`` -> ``("peft_lora", "bfloat16-weights")``."""
    variant, _, precision = name.partition(":")
    return variant, precision


def side_of(name: str) -> str:
    return "jlora" if name.startswith(("jlora", "xla")) else "peft"


def torch_twin(variant: str) -> str:
    return {"jlora_lora": "peft_lora", "jlora_qlora": "peft_lora", "jlora_full": "torch_full"}.get(variant, variant)


class Session:
    """The two workers and the folder the jlora side hands files over in (a context manager)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tmp = tempfile.TemporaryDirectory(prefix="jlora-sides-")
        self.dir = self.tmp.name
        self.workers: dict[str, Worker] = {}

    def __enter__(self) -> "Session":
        try:
            self.workers["jlora"] = Worker("jlora", python_of(self.args.jlora_python), "jlora_worker.py")
            self.workers["peft"] = Worker("peft", self.args.peft_python, "peft_worker.py")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for w in self.workers.values():
            w.close()
        self.tmp.cleanup()

    @property
    def jlora(self) -> Worker:
        return self.workers["jlora"]

    @property
    def peft(self) -> Worker:
        return self.workers["peft"]


def build_all(s: Session, workload: str, jlora_spec: dict, peft_spec: dict, rtol: float) -> dict[str, Any]:
    """Both sides' steps in every dtype, checked to be the same step; ``{"runs": {name: info},
    "jlora": <the first jlora build's answer>, "equivalence": [...], "unsupported": {dtype: why}}``."""
    runs: dict[str, dict] = {}
    first, checks, unsupported = None, [], {}
    for dtype in dtypes_of(s.args):
        j = s.jlora.call("build", workload=workload, dtype=dtype, dir=s.dir, **jlora_spec)
        if "unsupported" in j:
            unsupported[dtype] = j["unsupported"]
            print(f"jlora side, {dtype}: not built: {j['unsupported']}", flush=True)
        else:
            first = first or j
            runs.update(j["runs"])
        if first is None:
            raise SystemExit(f"the jlora side built nothing to hand over ({unsupported}); try --dtype float32")
        p = s.peft.call("build", workload=workload, dtype=dtype, files=first["files"], lora_config=first["lora_config"],
                        lr=first["lr"], threads=s.args.threads, **peft_spec)
        runs.update(p["runs"])
        for jname, jinfo in j.get("runs", {}).items():
            variant = parts(jname)[0]
            for pname, pinfo in p["runs"].items():
                if variant == "jlora_qlora" or parts(pname)[0] != torch_twin(variant):
                    continue
                tol = rtol if dtype == "float32" else BF16_RTOL
                rel = abs(jinfo["loss0"] - pinfo["loss0"]) / abs(pinfo["loss0"])
                checks.append({"jlora": jname, "peft": pname, "jlora_loss0": jinfo["loss0"],
                               "torch_loss0": pinfo["loss0"], "relative_diff": rel, "rtol": tol,
                               "jlora_trainable": jinfo["trainable"],
                               "torch_trainable": pinfo["trainable"]})
                print(f"{jname} vs {pname}: trainable {jinfo['trainable']:,} / {pinfo['trainable']:,}; loss at the "
                      f"initial adapter {jinfo['loss0']:.6f} / {pinfo['loss0']:.6f} (relative difference {rel:.1e}, "
                      f"rtol {tol:g})", flush=True)
                if jinfo["trainable"] != pinfo["trainable"] or not rel <= tol:
                    raise SystemExit(f"not the same step: {jname} vs {pname}: trainable counts or initial losses "
                                     "differ")
    return {"runs": runs, "jlora": first, "equivalence": checks, "unsupported": unsupported}


def measure(s: Session, built: dict[str, Any], extra_ratios: tuple = ()) -> dict[str, Any]:
    """Probes, the alternation, memory; the result record (see the module doc)."""
    args, runs = s.args, built["runs"]
    probes = {}
    for dtype in dtypes_of(args):
        for side, kw in (("jlora", {}), ("peft", {"threads": args.threads})):
            answer = s.workers[side].call("probe", n=args.matmul_n, dtype=dtype, **kw)
            probes[answer["run"]] = answer["flops"]
    steps = [n for n in runs]
    turns = {name: (s.workers[side_of(name)], name) for name in [*steps, *probes]}
    pids = [w.pid for w in s.workers.values()]
    wait = (lambda: wait_quiet(args.quiet_below, args.wait_quiet, pids=pids)) if args.wait_quiet > 0 else None
    load_before = loadavg()
    alt = alternate(turns, args.rounds, args.steps, pause=args.pause, sample_load=CpuLoad(pids).sample,
                    before_round=wait)
    load_after = loadavg()
    quiet = [i for i, x in enumerate(alt["load"]) if x and x["other_cores"] < args.quiet_below]
    pick = lambda values: [values[i] for i in quiet]  # noqa: E731
    mm = {name: [flops / t for t in round_medians(alt, name)] for name, flops in probes.items()}
    flops_of = {}  # one FLOP count per kind of step, torch's (float32 where measured), for both frameworks
    for name, info in sorted(runs.items(), key=lambda kv: "float32" not in kv[0]):
        if side_of(name) == "peft":
            flops_of.setdefault(parts(name)[0], info["matmul_flops"])
    out_runs = {}
    for name in steps:
        variant, precision = parts(name)
        info, per_round = runs[name], round_medians(alt, name)
        probe = mm[f"{'xla' if side_of(name) == 'jlora' else 'torch'}_matmul:{precision.split('-')[0]}"]
        flops = flops_of.get(torch_twin(variant))
        flops = flops + info.get("flops_delta", 0.0) if flops else flops  # e.g. the SFT head at the targets only
        mem = s.workers[side_of(name)].call("memory", name=name)
        r = {**info, "side": side_of(name), "variant": variant, "precision": precision, "first_s": alt["first_s"][name],
             "step_s": statistics.median(per_round), "round_s": per_round, "step_s_min": min(per_round),
             "step_s_max": max(per_round), "step_flops": flops, "memory_after": mem,
             "flop_per_s": summary([flops / t for t in per_round]) if flops else None,
             "of_matmul": summary([flops / t / p for t, p in zip(per_round, probe)]) if flops else None}
        r["quiet"] = {"step_s": summary(pick(per_round)),
                      "of_matmul": summary(pick(r["of_matmul"]["per_round"])) if flops else None} if quiet else None
        out_runs[name] = r
    peft_bf16 = min((n for n in steps if n.startswith("peft_lora:bfloat16")), key=lambda n: out_runs[n]["step_s"],
                    default=None)
    pairs = [("jlora_lora:float32", "peft_lora:float32"), ("jlora_lora:bfloat16", peft_bf16),
             ("peft_lora:bfloat16-weights", "peft_lora:bfloat16-autocast"),
             ("jlora_lora:bfloat16", "jlora_lora:float32"), (peft_bf16, "peft_lora:float32"),
             *(("xla_matmul:" + d, "torch_matmul:" + d) for d in DTYPES), *extra_ratios]
    ratios = {f"{a}/{b}": paired(alt, a, b) for a, b in pairs if a in turns and b in turns}
    other = [x["other_cores"] for x in alt["load"] if x]
    return {
        "runs": out_runs, "peft_bf16": peft_bf16, "equivalence": built["equivalence"],
        "unsupported": built["unsupported"], "ratios": ratios,
        "ratios_quiet": {k: summary(pick(v["per_round"])) for k, v in ratios.items()} if quiet else None,
        "matmul": {"n": args.matmul_n, **{k: summary(v) for k, v in mm.items()},
                   "quiet": {k: summary(pick(v)) for k, v in mm.items()} if quiet else None},
        "alternation": {"rounds": args.rounds, "steps_per_round": args.steps, "pause_s": args.pause,
                        "order_first_round": list(turns), "times_s": alt["rounds"], "order": alt["order"],
                        "first_s": alt["first_s"], "load": alt["load"], "waited": alt["before"],
                        "idle_cpu_s": alt["idle_cpu_s"], "quiet_below_cores": args.quiet_below,
                        "wait_quiet_s": args.wait_quiet, "quiet_rounds": quiet, "other_cores": summary(other),
                        "steal_cores": summary([x["steal_cores"] for x in alt["load"] if x])},
        "machine": {"driver": machine_info(), "jlora": s.jlora.call("machine")["info"],
                    "peft": s.peft.call("machine")["info"], "loadavg_before": load_before, "loadavg_after": load_after},
        "args": {k: str(v) for k, v in vars(args).items()}}


def label(name: str) -> str:
    variant, precision = parts(name)
    return {"jlora_lora": "jlora LoRA", "jlora_qlora": "jlora QLoRA", "jlora_full": "jlora full",
            "peft_lora": "PEFT LoRA", "torch_full": "torch full"}[variant] + " " + {
        "float32": "fp32", "bfloat16": "bf16", "bfloat16-weights": "bf16 weights",
        "bfloat16-autocast": "bf16 autocast"}[precision]


def table_lines(result: dict, workload_line: str, per_step: tuple[str, float] | None = None) -> list[str]:
    """The printed report: machine lines, the workload, one column per step run, the ratios and the load.
    ``per_step``: (unit, count per step), e.g. ("tokens", 1536), for a throughput row."""
    runs, alt, mm = result["runs"], result["alternation"], result["matmul"]
    names = list(runs)
    mib = lambda b: "n/a" if b is None else f"{b / 2**20:.1f}"  # noqa: E731
    cell = lambda f: [f(runs[n]) for n in names]  # noqa: E731

    def memory(r: dict) -> str:
        if r["side"] == "jlora":
            m = r.get("memory") or {}
            return f"XLA {mib(m.get('argument'))} + {mib(m.get('temp'))} + {mib(m.get('output'))}" if m else "n/a"
        t = r["memory_after"]["tensors"]
        return f"tensors {mib(t['total'])} ({mib(t['existing'])} + {mib(t['step_peak'])})"
    def stored(r: dict) -> str:
        short = lambda ds: "+".join(sorted(d.replace("torch.", "").replace("bfloat", "bf").replace("float", "fp")  # noqa: E731
                                           for d in ds)) or "–"
        if r["side"] == "jlora":
            return f"{short(r['dtypes']['frozen'])} / {short(r['dtypes']['trainable'])}"
        return f"{short(r['frozen_dtypes'])} / {short(r['trainable_dtypes'])}"
    m = result["machine"]
    lines = [f"jlora side: {machine_line(m['jlora'])}", f"PEFT side: {machine_line(m['peft'])}",
             f"load (/proc/loadavg) before: {m['loadavg_before']}; after: {m['loadavg_after']}", workload_line,
             *(f"not measured: jlora {d}: {why}" for d, why in result["unsupported"].items()),
             *(f"same step: {e['jlora']} / {e['peft']}: trainable {e['jlora_trainable']:,} / {e['torch_trainable']:,}, "
               f"loss at the initial adapter {e['jlora_loss0']:.6f} / {e['torch_loss0']:.6f} (relative "
               f"{e['relative_diff']:.1e}, rtol {e['rtol']:g})" for e in result["equivalence"]),
             "| train step | " + " | ".join(label(n) for n in names) + " |", "|" + " --- |" * (len(names) + 1),
             md_row("params stored in: frozen / trainable", cell(stored)),
             md_row(f"median step (s) (min–max of round medians), {alt['rounds']} x {alt['steps_per_round']}",
                    cell(lambda r: f"{r['step_s']:.3f} ({r['step_s_min']:.3f}–{r['step_s_max']:.3f})")),
             *([md_row(f"{per_step[0]}/s (median step)", cell(lambda r: f"{per_step[1] / r['step_s']:.0f}"))]
               if per_step else []),
             md_row("XLA compile (s); first call (s)",
                    cell(lambda r: f"{r['compile_s']:.1f}; {r['first_s']:.2f}" if "compile_s" in r else
                         f"–; {r['first_s']:.2f}")),
             md_row("step GFLOP: matmuls (torch count + attention, less what jlora skips); XLA's count",
                    cell(lambda r: (f"{r['step_flops'] / 1e9:.1f}" if r["step_flops"] else "n/a") +
                         (f"; {x / 1e9:.1f}" if (x := r.get("xla_flops") or r.get("xla_flops_plain_loss")) else ""))),
             md_row("GFLOP/s, median (min–max)", cell(lambda r: spread(r["flop_per_s"], ".0f", 1e9))),
             md_row(f"share of the same side's {mm['n']}³ matmul FLOP/s in its dtype", cell(
                 lambda r: spread(r["of_matmul"]))),
             *([md_row(f"quiet rounds ({len(alt['quiet_rounds'])}): median step (s); share of the matmul",
                       cell(lambda r: f"{r['quiet']['step_s']['median']:.3f}; " + spread(r["quiet"]["of_matmul"])))]
               if alt["quiet_rounds"] else []),
             md_row("memory (MiB): XLA arguments + temps + outputs / torch live tensors (existing + step)",
                    cell(memory)),
             md_row("peak RSS of the worker (MiB)", cell(lambda r: f"{r['memory_after']['peak_rss_mib']:.0f}")), ""]
    return lines + footer_lines(result)


def footer_lines(result: dict) -> list[str]:
    ratios, quiet, alt, mm = result["ratios"], result["ratios_quiet"], result["alternation"], result["matmul"]
    per = lambda xs: " ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    lines = []
    for key, r in ratios.items():
        a, b = key.split("/")
        lines.append(f"{label(a)} / {label(b)} step time = {spread(r)} over {r['rounds']} rounds (per round: "
                     f"{per(r['per_round'])})" + (f"; quiet rounds {spread(quiet[key])}" if quiet else "")
                     if not a.startswith("xla") else
                     f"XLA / torch {parts(a)[1]} matmul time = {spread(r)}")
    if result["peft_bf16"]:
        lines.append(f"PEFT bf16 = {label(result['peft_bf16'])} (the faster PEFT bf16 run by median step)")
    for name in (k for k in mm if ":" in k):
        lines.append(f"{'XLA' if name.startswith('xla') else 'torch'} {mm['n']}³ {parts(name)[1]} matmul: "
                     f"GFLOP/s {spread(mm[name], '.0f', 1e9)}")
    other, idle = alt["other_cores"], alt["idle_cpu_s"]
    lines += [f"quiet rounds (other processes < {alt['quiet_below_cores']} cores): {len(alt['quiet_rounds'])} of "
              f"{alt['rounds']}",
              "other processes' CPU during the rounds (cores, /proc/stat, not counting the driver and its workers): "
              + (f"median {other['median']:.2f} (min–max {other['min']:.2f}–{other['max']:.2f}); per round: "
                 f"{per(other['per_round'])}" if other else "n/a"),
              f"pause before each turn {alt['pause_s']:g} s; CPU each worker took between its turns (spin-waiting "
              f"threads), over all rounds: " + ", ".join(f"{k} {v:.2f} s" for k, v in idle.items()),
              *([f"waited for a quiet machine before each round (up to {alt['wait_quiet_s']:.0f} s): "
                 + " ".join(f"{x['waited_s']:.0f}s{'' if x['quiet'] else '(not quiet)'}" for x in alt["waited"])]
                if alt["waited"] else [])]
    return lines
