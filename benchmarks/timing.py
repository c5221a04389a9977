"""Wall-clock timing of jitted (or torch) steps for the benchmarks: medians, never single shots."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax


def median_seconds(run: Callable[[], Any], steps: int, warmup: int = 2,
                   sync: Callable[[Any], Any] = jax.block_until_ready) -> tuple[float, float]:
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


def interleaved_medians(runs: dict[str, Callable[[], Any]], rounds: int, warmup: int = 2,
                        min_seconds: float = 6.0, max_rounds: int = 300) -> dict[str, float]:
    """Median seconds of each of ``runs``, timed in turns (a, b, c, a, b, c, ...) rather than one after
    the other, so that a slow spell of the machine hits them all alike; ``warmup`` untimed calls each.
    Fast calls get more rounds: at least ``rounds``, and enough to fill about ``min_seconds``
    (at most ``max_rounds``)."""
    for _ in range(max(warmup - 1, 0)):  # the first calls compile
        for run in runs.values():
            jax.block_until_ready(run())
    start = time.perf_counter()
    for run in runs.values():
        jax.block_until_ready(run())
    one_round = time.perf_counter() - start
    rounds = max(rounds, min(max_rounds, int(min_seconds / max(one_round, 1e-9))))
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(run())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
