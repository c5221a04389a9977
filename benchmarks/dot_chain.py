"""How fast XLA's dots run outside an HF model: a chain of MiniLM-shaped MLP blocks, timed whole and
per op class (op_profile.py), forward and forward+backward, with nothing / exact gelu / gelu and a
LayerNorm between the dots. BENCHMARKS.md (issue 11) compares the dots' GFLOP/s here with the same
shapes inside the `jlora finetune` step.

    python benchmarks/dot_chain.py [--layers 6] [--tokens 2048] [--width 384] [--hidden 1536]
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import op_profile


def layer_norm(x: jax.Array) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5)


def chain(x: jax.Array, w1: list, w2: list, between: str) -> jax.Array:
    """``x + act(x @ w1) @ w2`` per block; ``between``: "none", "gelu" (exact), "gelu+ln"."""
    for a, b in zip(w1, w2):
        h = x @ a
        if between != "none":
            h = jax.nn.gelu(h, approximate=False)
        x = x + h @ b
        if between == "gelu+ln":
            x = layer_norm(x)
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    w1 = [jnp.asarray(rng.standard_normal((args.width, args.hidden), dtype=np.float32) * 0.05) for _ in range(args.layers)]
    w2 = [jnp.asarray(rng.standard_normal((args.hidden, args.width), dtype=np.float32) * 0.05) for _ in range(args.layers)]
    x = jnp.asarray(rng.standard_normal((args.tokens, args.width), dtype=np.float32))
    print("| pass | between the dots | step (ms) | dots (ms) | dots GFLOP/s | elementwise (ms) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for grad in (False, True):
        for between in ("none", "gelu", "gelu+ln"):
            fn = (lambda x, a, b, m=between: chain(x, a, b, m)) if not grad else \
                jax.grad(lambda x, a, b, m=between: jnp.sum(chain(x, a, b, m) ** 2))
            compiled = jax.jit(fn).lower(x, w1, w2).compile()
            run = lambda c=compiled: c(x, w1, w2)  # noqa: E731
            for _ in range(3):
                jax.block_until_ready(run())
            times = []
            for _ in range(args.steps):
                start = time.perf_counter()
                jax.block_until_ready(run())
                times.append(time.perf_counter() - start)
            table = op_profile.breakdown(op_profile.trace_ops(run, 3), op_profile.hlo_ops(compiled.as_text()))
            dots = table["classes"].get("matmul", {"seconds": 0.0, "gflops_per_s": 0.0})
            other = table["classes"].get("elementwise+reduce", {"seconds": 0.0})
            print(f"| {'fwd+bwd' if grad else 'fwd'} | {between} | {statistics.median(times) * 1e3:.1f} | "
                  f"{dots['seconds'] * 1e3:.1f} | {dots['gflops_per_s']:.0f} | {other['seconds'] * 1e3:.1f} |")


if __name__ == "__main__":
    main()
