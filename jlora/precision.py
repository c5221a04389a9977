"""Mixed precision: which compute dtype pays on this backend, and the casts of a bf16 LoRA run.

jlora's bfloat16 recipe (the tasks' ``--dtype bfloat16``, and what ``--dtype auto`` picks where it
pays) is the usual mixed-precision split, the one PEFT users get with a bf16 model:

* the frozen base's floating params are *stored* in bfloat16 (:func:`cast_floats`): half the bytes,
  and no per-step float32 -> bfloat16 convert of every kernel; quantized kernels (QLoRA) keep
  their codes and float32 scales and dequantize straight to the compute dtype;
* the model computes in bfloat16 (the HF Flax ``dtype=``): every base matmul ``x @ W`` runs on
  the bf16 matrix units (AMX / AVX512-BF16 on CPUs, tensor cores on GPUs, the MXU on TPUs);
* the adapters ``lora_a``/``lora_b``, a trained head, the optimizer state and its updates stay
  float32 (the master copies); the low-rank path ``scale * (x @ A) @ B`` is formed in the promoted
  dtype of ``x`` and ``A`` (:func:`jlora.layers.compute_dtype`: float32 for float32 adapters, as
  PEFT's ``autocast_adapter_dtype`` does) and cast to the base output's dtype before the sum;
* losses, softmax normalizers and metrics are reduced in float32 (the fused LM-head loss
  accumulates its logsumexp in float32 whatever the kernel's dtype).

Whether bfloat16 is faster is *measured*, not assumed (:func:`has_fast_bf16`): on GPU and TPU it
always is; on a CPU only where XLA uses bf16 matrix units, which depends on the CPU *and* on the
jaxlib (on a Xeon with AMX-BF16, jax 0.12's bf16 matmul runs ~1.5 TFLOP/s against ~0.35 for
float32; jax <= 0.10 emulates bf16 at ~0.29 TFLOP/s, slower than its float32).
"""
from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.tree import Tree

DTYPES = ("auto", "bfloat16", "float32")
# bf16 is chosen on a CPU when its probe matmul is at least this many times faster than float32's
FAST_BF16_RATIO = 1.5


def _best_seconds(fn: Any, args: tuple, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compiles
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=None)
def matmul_speedup(platform: str | None = None, n: int = 1024, repeats: int = 5) -> float:
    """``float32 seconds / bfloat16 seconds`` of one ``n x n x n`` jitted matmul on the default
    device of ``platform`` (best of ``repeats`` each, after compiling; cached per process)."""
    device = jax.devices(platform)[0]
    matmul = jax.jit(lambda a, b: a @ b)
    x = np.random.default_rng(0).standard_normal((n, n), np.float32)
    seconds = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        a = jax.device_put(jnp.asarray(x, dtype), device)
        seconds[dtype] = _best_seconds(matmul, (a, a), repeats)
    return seconds[jnp.float32] / seconds[jnp.bfloat16]


def has_fast_bf16(platform: str | None = None) -> bool:
    """Whether bfloat16 matmuls are clearly faster than float32 on ``platform`` (default: JAX's
    default backend): always on GPU and TPU; on CPU, measured by :func:`matmul_speedup` (at least
    :data:`FAST_BF16_RATIO` x)."""
    platform = platform or jax.default_backend()
    if platform in ("gpu", "cuda", "rocm", "tpu"):
        return True
    return matmul_speedup(platform) >= FAST_BF16_RATIO


def resolve_dtype(name: str, *, flag: str = "--dtype", platform: str | None = None) -> str:
    """``"float32"`` or ``"bfloat16"`` for ``name`` in :data:`DTYPES`; ``"auto"`` is bfloat16 where
    :func:`has_fast_bf16`, float32 otherwise. ``flag`` names the option in the error."""
    if name not in DTYPES:
        raise ValueError(f"{flag}: expected one of {', '.join(DTYPES)}, got {name!r}")
    if name == "auto":
        return "bfloat16" if has_fast_bf16(platform) else "float32"
    return name


def describe_choice(name: str, resolved: str, platform: str | None = None) -> str:
    """A line saying what ``--dtype name`` resolved to, and why when it was ``auto``."""
    if name != "auto":
        return f"dtype: {resolved}"
    platform = platform or jax.default_backend()
    if platform == "cpu":
        return (f"dtype: {resolved} (--dtype auto: a bfloat16 matmul runs {matmul_speedup(platform):.2f}x "
                f"float32's speed on this CPU with jax {jax.__version__}; bfloat16 from {FAST_BF16_RATIO}x)")
    return f"dtype: {resolved} (--dtype auto: {platform} has fast bfloat16 matmuls)"


def cast_floats(tree: Tree, dtype: Any) -> Tree:
    """``tree`` with every floating array leaf cast to ``dtype``; integer leaves and quantized
    kernels (:mod:`jlora.qformats`, whose codes and scales are what they are) left as they are.
    Use it for a frozen base (``cast_floats(frozen, jnp.bfloat16)``), never for adapters or an
    optimizer state, which stay float32 masters."""
    from jlora.qformats import is_quantized

    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"cast_floats: dtype must be a floating dtype (bfloat16, float32, ...), got {dtype}")

    def cast(leaf: Any) -> Any:
        if is_quantized(leaf) or not hasattr(leaf, "dtype") or not jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf
        return leaf if leaf.dtype == dtype else jnp.asarray(leaf, dtype)

    return jax.tree_util.tree_map(cast, tree, is_leaf=is_quantized)
