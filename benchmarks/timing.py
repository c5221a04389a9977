"""Wall-clock timing of jitted (or torch) steps for the benchmarks: medians, never single shots.

jax is imported by the functions that time jax calls, not by the module: the two-process drivers
(workers.py) and the PEFT worker read the summaries here without it."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def _block(x: Any) -> Any:
    import jax
    return jax.block_until_ready(x)


def median_seconds(run: Callable[[], Any], steps: int, warmup: int = 2,
                   sync: Callable[[Any], Any] = _block) -> tuple[float, float]:
    """(first call incl. compile, median of ``steps`` calls after ``warmup``); ``sync`` waits for a result."""
    start = time.perf_counter()
    sync(run())
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        sync(run())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        sync(run())
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def interleaved_times(runs: dict[str, Callable[[], Any]], rounds: int, warmup: int = 2,
                      min_seconds: float = 20.0, max_rounds: int = 400) -> dict[str, list[float]]:
    """Seconds of each call of each of ``runs``, timed in turns rather than one after the other, so that a slow
    spell of the machine hits them all alike, with the order rotated each round (a b c, b c a, c a b,
    ...): on the CI box the first call of a fixed order was ~5% faster than the same call later in
    the round. ``warmup`` untimed calls each.
    Fast calls get more rounds: at least ``rounds``, and enough to fill about ``min_seconds``
    (at most ``max_rounds``)."""
    import jax
    for _ in range(max(warmup - 1, 0)):  # the first calls compile
        for run in runs.values():
            jax.block_until_ready(run())
    start = time.perf_counter()
    for run in runs.values():
        jax.block_until_ready(run())
    one_round = time.perf_counter() - start
    rounds = max(rounds, min(max_rounds, int(min_seconds / max(one_round, 1e-9))))
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for i in range(rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:
            start = time.perf_counter()
            jax.block_until_ready(runs[name]())
            times[name].append(time.perf_counter() - start)
    return times


def compile_train_step(step: Callable, state: Any, opt_state: Any, batch: Any, rest: Any) -> tuple[Callable, dict]:
    """Compile ``step(state, opt_state, batch, rest) -> (state, opt_state, loss)`` with the state and
    the optimizer state donated; return ``run()`` (one step on a copy of ``state``, returning the loss)
    and ``{compile_s, memory}`` (XLA's memory analysis: argument / output / alias / temp bytes)."""
    import jax
    import jax.numpy as jnp
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(state, opt_state, batch, rest).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    box = {"state": jax.tree_util.tree_map(jnp.copy, state), "opt": opt_state}

    def run():
        box["state"], box["opt"], loss = compiled(box["state"], box["opt"], batch, rest)
        return loss
    memory = {k: int(getattr(mem, f"{k}_size_in_bytes", 0) or 0) for k in ("argument", "output", "alias", "temp")} \
        if mem is not None else {}
    return run, {"compile_s": compile_s, "memory": memory}


def time_train_step(step: Callable, state: Any, opt_state: Any, batch: Any, rest: Any, steps: int) -> dict[str, Any]:
    """:func:`compile_train_step`, then the first call and the median of ``steps`` calls
    (:func:`median_seconds`), and the last loss."""
    run, info = compile_train_step(step, state, opt_state, batch, rest)
    first, median = median_seconds(run, steps)
    return {**info, "first_step_s": first, "step_s": median, "loss": float(run())}


def alternate(runs: dict[str, Callable[[], Any]], rounds: int, steps: int, warmup: int = 2,
              sample_load: Callable[[], Any] | None = None,
              before_round: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Time ``runs`` (train steps of different frameworks, matmul probes) against each other in one
    process: after ``warmup`` untimed calls of each (the first one timed apart: compile / first step),
    ``rounds`` rounds, each running ``steps`` calls of every run in turn, the order rotated by one every
    round (a b c d, b c d a, ...), so that a slow spell of a shared machine hits a whole round and
    cancels in the per-round ratios of :func:`paired`. ``before_round()`` (e.g. :func:`machine.wait_quiet`)
    runs before each round, its result kept in ``"before"``; ``sample_load()`` (e.g.
    :meth:`machine.CpuLoad.sample`) is called as each round starts and as it ends, the second result kept.
    Returns ``{"first_s": {name: s}, "rounds": [{name: [s, ...]}], "order": [[name, ...]],
    "load": [sample, ...], "before": [...]}``."""
    import jax
    first = {}
    for name, run in runs.items():
        start = time.perf_counter()
        jax.block_until_ready(run())
        first[name] = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        for run in runs.values():
            jax.block_until_ready(run())
    names = list(runs)
    out: dict[str, Any] = {"first_s": first, "rounds": [], "order": [], "load": [], "before": []}
    for i in range(rounds):
        if before_round:
            out["before"].append(before_round())
        if sample_load:
            sample_load()  # this round's interval starts here
        order = names[i % len(names):] + names[:i % len(names)]
        times: dict[str, list[float]] = {name: [] for name in names}
        for name in order:
            for _ in range(steps):
                start = time.perf_counter()
                jax.block_until_ready(runs[name]())
                times[name].append(time.perf_counter() - start)
        out["rounds"].append(times)
        out["order"].append(order)
        if sample_load:
            out["load"].append(sample_load())
    return out


def round_medians(alternated: dict[str, Any], name: str) -> list[float]:
    """Per round, the median of ``name``'s calls in that round."""
    return [statistics.median(r[name]) for r in alternated["rounds"]]


def summary(values: list[float]) -> dict[str, Any] | None:
    """``{"per_round", "median", "min", "max", "rounds"}`` of per-round values (None when there are none)."""
    return {"per_round": values, "median": statistics.median(values), "min": min(values), "max": max(values),
            "rounds": len(values)} if values else None


def spread(r: dict[str, Any] | None, fmt: str = ".2f", scale: float = 1.0) -> str:
    """``"median (min–max)"`` of a :func:`summary`, each divided by ``scale``; "n/a" for None."""
    return "n/a" if not r else f"{r['median'] / scale:{fmt}} ({r['min'] / scale:{fmt}}–{r['max'] / scale:{fmt}})"


def paired(alternated: dict[str, Any], num: str, den: str) -> dict[str, Any]:
    """Ratio ``num / den`` per round (of the per-round medians), and its median, min and max over the rounds."""
    return summary([a / b for a, b in zip(round_medians(alternated, num), round_medians(alternated, den))])


def time_inference(base_fwd: Callable, lora_fwd: Callable, params: Any, lora: Any, config: Any,
                   shapes: tuple, rounds: int) -> dict[str, dict[str, float]]:
    """``{"BxT": {base_s, merged_s, unmerged_s, merged_over_base, unmerged_over_base}}``: jitted
    ``base_fwd(params, ids)`` on the base and on the merged params, and ``lora_fwd(params, lora, ids)``
    (unmerged), timed in turns (:func:`interleaved_times`) on ``(B, T)`` int32 ids for each of
    ``shapes``: median seconds of each, and the ratios as medians of the per-round ratios (paired, so a
    slow spell that hits a whole round cancels out)."""
    import jax.numpy as jnp
    import jlora
    merged = jlora.merge(params, lora, config)
    out = {}
    for batch, seq in shapes:
        ids = jnp.ones((batch, seq), jnp.int32)
        times = interleaved_times({"base_s": lambda: base_fwd(params, ids), "merged_s": lambda: base_fwd(merged, ids),
                                   "unmerged_s": lambda: lora_fwd(params, lora, ids)}, rounds)
        paired = lambda name: statistics.median(a / b for a, b in zip(times[name], times["base_s"]))  # noqa: E731
        out[f"{batch}x{seq}"] = {**{name: statistics.median(t) for name, t in times.items()}, "rounds": len(
            times["base_s"]), "merged_over_base": paired("merged_s"), "unmerged_over_base": paired("unmerged_s")}
    return out


def alternation_footer(alt: dict[str, Any], ratio_key: str = "jlora_lora/peft_lora") -> list[str]:
    """The lines under a jlora-vs-PEFT step table: the per-round ratio, the quiet rounds, the matmul
    probe, the other processes' CPU and the waits (``alt``: the ``alternation`` record of a result)."""
    ratio, quiet, mm, other = alt["ratios"][ratio_key], alt["ratios_quiet"], alt["matmul"], alt["other_cores"]
    per = lambda xs: " ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    return [f"jlora / PEFT step time = {spread(ratio)} (median (min–max) of per-round ratios over {ratio['rounds']} "
            f"rounds); per round: {per(ratio['per_round'])}",
            f"quiet rounds (other processes < {alt['quiet_below_cores']} cores): " + (
                f"{len(alt['quiet_rounds'])} of {alt['rounds']}; jlora / PEFT = {spread(quiet[ratio_key])}"
                if quiet else "none"),
            f"one {mm['n']}² fp32 matmul, GFLOP/s median (min–max): XLA {spread(mm['xla_matmul'], '.0f', 1e9)}, "
            f"torch {spread(mm['torch_matmul'], '.0f', 1e9)}",
            "other processes' CPU during the rounds (cores, /proc/stat): " + (
                f"median {other['median']:.2f} (min–max {other['min']:.2f}–{other['max']:.2f}); per round: "
                f"{per(other['per_round'])}" if other else "n/a"),
            *([f"waited for a quiet machine before each round (up to {alt['wait_quiet_s']:.0f} s): "
               + " ".join(f"{x['waited_s']:.0f}s{'' if x['quiet'] else '(not quiet)'}" for x in alt["waited"])]
              if alt["waited"] else [])]


def write_result(out: Any, name: str, result: dict[str, Any], table: Callable[[dict[str, Any]], str]) -> None:
    """Add the printed ``table(result)`` to ``result``, print it, and write ``<out>/<name>.json``."""
    import json
    from pathlib import Path
    result["table"] = report = table(result)
    print(report)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
