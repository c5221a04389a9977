"""The issue-10 versions of the two code paths issue 11 changed, kept to measure the change against
(benchmarks/levers.py compiles a step with these patched in, beside the current one, and times both
alternated in one process). Not used by the library.

* ``dense_delta`` / ``fused_dense_delta``: the LoRA scale applied to the ``(tokens, fan_out)`` output
  (``scale * (x @ A) @ B``) instead of the ``(tokens, r)`` hidden.
* ``lm_head_cross_entropy``: one ``(N, V)`` logits matmul in the forward and a row-block logsumexp
  over it, instead of vocabulary blocks with a block-wise logsumexp.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jlora.layers import compute_dtype

Array = jax.Array


def dense_delta(x: Array, lora_a: Array, lora_b: Array, scale: float, *,
                axis: Sequence[int] = (-1,), precision: Any = None) -> Array:
    axes = tuple(sorted(a % x.ndim for a in axis))
    dtype = compute_dtype(x, lora_a)
    hidden = jax.lax.dot_general(x.astype(dtype), lora_a.astype(dtype),
                                 ((axes, tuple(range(len(axes)))), ((), ())), precision=precision)
    out = jnp.tensordot(hidden, lora_b.astype(dtype), axes=1, precision=precision)
    return out * jnp.asarray(scale, dtype)


def fused_dense_delta(x: Array, lora_a: Array, lora_b: Array, scale: float, mask: Sequence[bool], *,
                      precision: Any = None) -> Array:
    dtype = compute_dtype(x, lora_a)
    hidden = jnp.einsum("...i,eir->...er", x.astype(dtype), lora_a.astype(dtype), precision=precision)
    parts = jnp.einsum("...er,ero->...eo", hidden, lora_b.astype(dtype), precision=precision) \
        * jnp.asarray(scale, dtype)
    zeros = jnp.zeros(parts.shape[:-2] + parts.shape[-1:], dtype)
    slots = iter(range(parts.shape[-2]))
    return jnp.concatenate([parts[..., next(slots), :] if on else zeros for on in mask], axis=-1)


def lm_head_cross_entropy(hidden: Array, kernel: Array, labels: Array, weights: Array | None = None, *,
                          transposed: bool = False, chunk_size: int = 1024) -> Array:
    d = hidden.shape[-1]
    weights = jnp.ones(labels.shape, jnp.float32) if weights is None else weights
    return _fused(hidden.reshape(-1, d), kernel, labels.reshape(-1), weights.reshape(-1).astype(jnp.float32),
                  transposed, chunk_size)


def _logits(h: Array, kernel: Array, transposed: bool) -> Array:
    spec = "nd,vd->nv" if transposed else "nd,dv->nv"
    return jnp.einsum(spec, h, kernel, preferred_element_type=jnp.float32)


def _row_logsumexp(logits: Array, rows: int) -> Array:
    """logsumexp of each row, ``rows`` rows at a time: ``exp(z - max)`` exists one ``(rows, V)``
    block at a time instead of as a second logits tensor (XLA materializes it before the sum)."""
    n = logits.shape[0]
    full, rest = divmod(n, rows)
    parts = []
    if full:
        block = lambda start: jax.nn.logsumexp(jax.lax.dynamic_slice_in_dim(logits, start, rows), axis=-1)  # noqa: E731
        parts.append(jax.lax.map(block, jnp.arange(full) * rows).reshape(-1))
    if rest:
        parts.append(jax.nn.logsumexp(logits[full * rows:], axis=-1))
    return jnp.concatenate(parts) if len(parts) > 1 else parts[0]


def _loss(logits: Array, labels: Array, weights: Array, chunk_size: int) -> tuple[Array, Array]:
    """(weighted mean NLL, logsumexp per row), with about ``tokens x chunk_size`` transient floats."""
    n, vocab = logits.shape
    lse = _row_logsumexp(logits, max(1, min(n, n * chunk_size // vocab)))
    picked = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    return jnp.sum((lse - picked) * weights) / jnp.sum(weights), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused(h: Array, kernel: Array, labels: Array, weights: Array, transposed: bool, chunk_size: int) -> Array:
    return _loss(_logits(h, kernel, transposed), labels, weights, chunk_size)[0]


def _fused_fwd(h, kernel, labels, weights, transposed, chunk_size):
    logits = _logits(h, kernel, transposed)
    loss, lse = _loss(logits, labels, weights, chunk_size)
    return loss, (h, kernel, labels, weights, logits, lse)


def _fused_bwd(transposed, chunk_size, residuals, g):
    h, kernel, labels, weights, logits, lse = residuals
    n, vocab = logits.shape
    vocab_axis = 0 if transposed else 1
    coef = (weights * (g / jnp.sum(weights)))[:, None]
    h_k = h.astype(kernel.dtype)  # matmuls in the kernel's dtype, accumulated in float32
    f32 = dict(preferred_element_type=jnp.float32)

    def columns(start, width):
        """dh and dW of the vocabulary columns [start, start + width)."""
        z = jax.lax.dynamic_slice_in_dim(logits, start, width, axis=1)
        onehot = labels[:, None] == start + jnp.arange(width)[None, :]
        dz = ((jnp.exp(z - lse[:, None]) - onehot) * coef).astype(kernel.dtype)
        w = jax.lax.dynamic_slice_in_dim(kernel, start, width, axis=vocab_axis)
        if transposed:
            return jnp.einsum("nv,vd->nd", dz, w, **f32), jnp.einsum("nv,nd->vd", dz, h_k, **f32)
        return jnp.einsum("nv,dv->nd", dz, w, **f32), jnp.einsum("nd,nv->dv", h_k, dz, **f32)

    def one_chunk(carry, start):
        dh, dkernel = carry
        dh_c, dw = columns(start, width)
        dkernel = jax.lax.dynamic_update_slice_in_dim(dkernel, dw.astype(kernel.dtype), start, axis=vocab_axis)
        return (dh + dh_c, dkernel), None

    width = min(chunk_size, vocab)
    full, rest = divmod(vocab, width)
    carry = (jnp.zeros(h.shape, jnp.float32), jnp.zeros_like(kernel))
    carry, _ = jax.lax.scan(one_chunk, carry, jnp.arange(full) * width)
    dh, dkernel = carry
    if rest:
        dh_c, dw = columns(full * width, rest)
        dh = dh + dh_c
        dkernel = jax.lax.dynamic_update_slice_in_dim(dkernel, dw.astype(kernel.dtype), full * width, axis=vocab_axis)
    return dh.astype(h.dtype), dkernel, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)
