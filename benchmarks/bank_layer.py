"""One adapted layer with a different adapter per row, three ways (the layer part of ``adapter_bank.py``).

Shapes: a Dense of SmolLM2-135M's q_proj (fan_in 576, fan_out 576), adapters r=8, N in a bank; x is
(rows, tokens, 576) with one adapter id per row, ids round-robin (``i % N``: at 16 rows and N=64 only 16
adapters are used). Variants of the LoRA path ``y = scale[id] * (x @ A[id]) @ B[id]``:

* ``gather``: ``jlora.bank.bank_delta`` with the selected factors gathered, ``A[ids] (rows, 576, R)``,
  ``B[ids] (rows, R, 576)``, and two batched matmuls (what ``jlora.bank.apply`` runs); no N in the cost;
* ``ragged``: the tokens sorted by id, ``jax.lax.ragged_dot(x_sorted, A (N, 576, R), group_sizes)``,
  the scale, ``ragged_dot`` with B, unsorted (Punica's SGMV as JAX spells it; the permutation is
  computed once per call, the sort / unsort gathers run in every layer);
* ``ragged_sorted``: the same with the rows already sorted by adapter (a server that sorts its batch
  once): no permutation in the layer;
* ``onehot``: ``h = einsum(x, A over all N) (tokens, N, R)`` masked by ``one_hot(ids) * scale``, then
  ``einsum(h, B over all N)``: FLOPs grow with N;
* ``base``: the frozen ``x @ W`` alone (576x576), for scale.

Each variant runs ``LAYERS`` such layers in one jitted ``lax.scan`` (``x <- x + f_l(x)``, independent
weights per layer, as in a 30-layer model) so that one dispatch does not dominate a decode-sized
layer; times are reported per layer. The variants' outputs are checked equal (allclose) first.
On XLA:CPU ``ragged_dot`` is expanded to a dense masked computation over all N groups (jax's
fallback), so its cost grows with N here; a GPU/TPU backend has a grouped kernel.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jlora.bank import bank_delta
from timing import alternate, round_medians, spread, summary

FAN_IN, FAN_OUT, RANK, LAYERS = 576, 576, 8, 30
SHAPES = {"decode 16x1": (16, 1), "decode 64x1": (64, 1), "prefill 16x32": (16, 32)}
QUICK_SHAPES = {"decode 4x1": (4, 1), "prefill 4x8": (4, 8)}
ROUND_S = 0.5  # seconds of the slowest variant per round (fewer calls for slow cases, at most `steps`)
VARIANTS = ("base", "gather", "ragged", "ragged_sorted", "onehot")


def _gather(x, a, b, w, scale, ids, order, inverse, sizes):
    return bank_delta(x, a[ids], b[ids], scale[ids])


def _ragged(x, a, b, w, scale, ids, order, inverse, sizes, presorted=False):
    rows, tokens, _ = x.shape
    flat = x.reshape(rows * tokens, -1)
    token_ids = jnp.repeat(ids, tokens)
    if not presorted:
        flat, token_ids = flat[order], token_ids[order]
    hidden = jax.lax.ragged_dot(flat, a, sizes) * scale[token_ids][:, None]
    out = jax.lax.ragged_dot(hidden, b, sizes)
    return (out if presorted else out[inverse]).reshape(rows, tokens, -1)


def _onehot(x, a, b, w, scale, ids, order, inverse, sizes):
    mask = jax.nn.one_hot(ids, a.shape[0], dtype=x.dtype) * scale[None, :]  # (rows, N)
    hidden = jnp.einsum("bti,nir->btnr", x, a) * mask[:, None, :, None]
    return jnp.einsum("btnr,nro->bto", hidden, b)


def _base(x, a, b, w, scale, ids, order, inverse, sizes):
    return x @ w


PATHS: dict[str, Callable] = {"base": _base, "gather": _gather, "ragged": _ragged,
                              "ragged_sorted": lambda *a: _ragged(*a, presorted=True), "onehot": _onehot}


def stacked(path: Callable) -> Callable:
    """``LAYERS`` layers of ``x <- x + path(x, layer weights)`` in one jit (a ``lax.scan``)."""
    def run(x, a, b, w, scale, ids):
        tokens = x.shape[1]
        order = jnp.argsort(jnp.repeat(ids, tokens), stable=True)
        inverse = jnp.argsort(order)
        sizes = jnp.bincount(ids, length=a.shape[1]).astype(jnp.int32) * tokens

        def layer(x, weights):
            a_l, b_l, w_l, s_l = weights
            return x + path(x, a_l, b_l, w_l, s_l, ids, order, inverse, sizes), None
        return jax.lax.scan(layer, x, (a, b, w, scale))[0]
    return jax.jit(run)


def case(rows: int, tokens: int, n: int, layers: int, seed: int = 0) -> tuple[Any, ...]:
    """(x, A (L, N, in, R), B (L, N, R, out), W (L, in, out), scale (L, N), ids (rows,)); ids round-robin."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape, std=1.0: jnp.asarray(std * rng.standard_normal(shape), jnp.float32)  # noqa: E731
    return (normal(rows, tokens, FAN_IN), normal(layers, n, FAN_IN, RANK, std=FAN_IN ** -0.5),
            normal(layers, n, RANK, FAN_OUT, std=0.02), normal(layers, FAN_IN, FAN_OUT, std=0.02),
            jnp.asarray(rng.uniform(1.0, 2.0, (layers, n)), jnp.float32), jnp.arange(rows, dtype=jnp.int32) % n)


def layer_bench(rounds: int, steps: int, quick: bool = False, ns: tuple[int, ...] = (8, 64)) -> dict[str, Any]:
    """Per (shape, N): the variants checked equal, then alternated (``timing.alternate``, up to ``steps`` calls
    of each per round, fewer when the slowest variant's call is long); µs per layer."""
    layers = 2 if quick else LAYERS
    out: dict[str, Any] = {"fan_in": FAN_IN, "fan_out": FAN_OUT, "rank": RANK, "layers_per_call": layers,
                           "cases": {}}
    for label, (rows, tokens) in (QUICK_SHAPES if quick else SHAPES).items():
        for n in ns:
            args = case(rows, tokens, n, layers)
            sorted_args = (args[0], *args[1:5], jnp.sort(args[5]))  # the same rows' ids, sorted
            fns = {v: stacked(PATHS[v]) for v in VARIANTS}
            runs = {v: (lambda f=fns[v], a=(sorted_args if v == "ragged_sorted" else args): f(*a)) for v in VARIANTS}
            ref = np.asarray(runs["gather"]())
            check = {}
            for v in ("ragged", "onehot"):
                got = np.asarray(runs[v]())
                check[v] = float(np.max(np.abs(got - ref)))
                if not np.allclose(got, ref, rtol=1e-4, atol=1e-4):
                    raise SystemExit(f"layer {label}, N={n}: {v} differs from gather by {check[v]:.2e}")
            # sorted rows: the gather path on the sorted ids equals ragged_sorted
            ref_sorted = np.asarray(fns["gather"](*sorted_args))
            check["ragged_sorted"] = float(np.max(np.abs(np.asarray(runs["ragged_sorted"]()) - ref_sorted)))
            if not check["ragged_sorted"] <= 1e-4 * max(1.0, float(np.max(np.abs(ref_sorted)))):
                raise SystemExit(f"layer {label}, N={n}: ragged_sorted differs from gather by {check['ragged_sorted']}")
            call_s = {}
            for v, run in runs.items():  # compiled above, except base: once more each, timed
                jax.block_until_ready(run())
                start = time.perf_counter()
                jax.block_until_ready(run())
                call_s[v] = time.perf_counter() - start
            calls = max(1, min(steps, int(ROUND_S / max(call_s.values()))))  # the slowest ~ROUND_S per round
            alt = alternate(runs, rounds, calls, warmup=1)
            us = {v: [t / layers * 1e6 for t in round_medians(alt, v)] for v in VARIANTS}
            out["cases"][f"{label}, N={n}"] = {
                "rows": rows, "tokens": tokens, "n": n, "max_abs_diff_vs_gather": check, "calls_per_round": calls,
                "us_per_layer": {v: summary(us[v]) for v in VARIANTS},
                "over_gather": {v: summary([a / g for a, g in zip(us[v], us["gather"])]) for v in VARIANTS}}
    return out


def layer_rows(result: dict[str, Any]) -> list[str]:
    """The micro-benchmark's markdown table."""
    lines = [f"Layer micro-benchmark: LoRA path of one {result['fan_in']}x{result['fan_out']} Dense, "
             f"r={result['rank']}, {result['layers_per_call']} layers per jitted call (lax.scan), µs per layer, "
             "median (min–max) over rounds; [median of the per-round time / gather's]",
             "| rows x tokens, N | " + " | ".join(VARIANTS) + " |", "| --- |" + " --- |" * len(VARIANTS)]
    for name, c in result["cases"].items():
        cells = [f"{spread(c['us_per_layer'][v], '.1f')} [{statistics.median(c['over_gather'][v]['per_round']):.2f}]"
                 for v in VARIANTS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    worst = max(max(c["max_abs_diff_vs_gather"].values()) for c in result["cases"].values())
    lines.append(f"(ragged, ragged_sorted and onehot checked equal to gather first: max |diff| {worst:.1e})")
    return lines
