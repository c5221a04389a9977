"""Next-token cross-entropy fused with the output projection, at the memory of one logits tensor.

For a language model the logits ``(tokens, vocab)`` dwarf every other activation (GPT-2: 8x128
tokens x 50257 float32 = 196 MiB, more than all of GPT-2 small's layer activations taken together
at that batch). The plain recipe ``optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1],
ids[:, 1:])`` holds up to three tensors of that size at once: the logits, their shifted copy (the
slice ``[:, :-1]`` is a copy) and the gradient of the logits (with a transposed copy of it for the
output kernel's gradient in a full fine-tune). :func:`lm_head_cross_entropy` keeps only the logits
themselves: with ``h`` the final hidden states ``(N, d)``, ``W`` the output kernel ``(d, V)``,
labels ``y`` and weights ``w`` (0 for positions that have no next token),

    z = h @ W,    loss = sum_n w_n (logsumexp(z_n) - z_{n, y_n}) / sum_n w_n.

The forward pass walks the vocabulary in blocks ``c`` of ``chunk_size`` columns: ``z_c = h @ W_c``
is kept as it is made (the logits live as ``(V // chunk_size, N, chunk_size)`` blocks plus a
remainder: the bytes of one logits tensor), and its row maximum ``m_c`` and ``s_c = sum exp(z_c -
m_c)`` are taken while the block is fresh, ``logsumexp(z_n) = M + log sum_c s_c exp(m_c - M)``.
The backward pass walks the same blocks,

    dz_c = (softmax(z)_c - onehot(y)_c) * w * g / sum(w),   dh += dz_c @ W_c^T,   dW_c = h^T @ dz_c,

so the gradient of the logits only ever exists one ``(N, chunk_size)`` block at a time, each block
of ``dW`` is written once (no accumulator of ``W``'s size is read and written per block), and the
only running sum is ``dh`` ``(N, d)``. The logits are saved from the forward pass, never
recomputed: the FLOPs are those of the unfused recipe. (Blocks rather than one ``h @ W`` matmul:
on XLA:CPU the ``(N, d) x (d, chunk)`` matmuls ran at ~310 GFLOP/s against ~265 for the whole
``(N, V)`` one, and the block-wise logsumexp needs no copy of the logits; the loss's forward plus
backward took 0.87x (GPT-2 d=256) and 0.93x (d=768) of the row-block version it replaced.) When
``W`` is frozen (LoRA with the head not adapted) the ``dW`` blocks are dead code that XLA removes.

The projection is applied here, so the model must hand over its final hidden states (for Hugging
Face models: ``output_hidden_states=True`` and ``.hidden_states[-1]``; the unused logits of the
model call are then removed by XLA). Do not use it when the output projection itself carries a
LoRA adapter: the adapter would be bypassed.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def next_token_targets(ids: Array, token_weights: Array | None = None,
                       segment_ids: Array | None = None) -> tuple[Array, Array]:
    """``(labels, weights)`` for next-token prediction over ``ids`` of shape ``(batch, seq)``.

    ``labels[:, t] = ids[:, t + 1]`` and the last position, which has no next token, gets label 0
    and weight 0, so that the logits need no ``[:, :-1]`` slice (a full copy of them).

    ``token_weights`` (same shape): each token's weight as a target (e.g. 0 on a prompt, 1 on its
    completion); position ``t`` gets ``token_weights[:, t + 1]``. ``segment_ids`` (same shape; packed
    rows: 1, 2, ... per example, 0 on padding): position ``t`` gets weight 0 where token ``t + 1``
    belongs to another example, or ``t`` is padding, so no example is predicted from another one.
    """
    if ids.ndim != 2:
        raise ValueError(f"ids: expected shape (batch, seq), got {ids.shape}")
    for name, value in (("token_weights", token_weights), ("segment_ids", segment_ids)):
        if value is not None and value.shape != ids.shape:
            raise ValueError(f"{name}: expected the shape of ids {ids.shape}, got {value.shape}")
    shift = lambda x, fill: jnp.concatenate([x[:, 1:], jnp.full_like(x[:, :1], fill)], axis=1)  # noqa: E731
    labels = shift(jnp.asarray(ids), 0)
    weights = jnp.ones(ids.shape, jnp.float32).at[:, -1].set(0.0) if token_weights is None else \
        shift(jnp.asarray(token_weights, jnp.float32), 0.0)
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids)
        weights = jnp.where((shift(segment_ids, -1) == segment_ids) & (segment_ids > 0), weights, 0.0)
    return labels, weights


def lm_head_cross_entropy(hidden: Array, kernel: Array, labels: Array, weights: Array | None = None, *,
                          transposed: bool = False, chunk_size: int = 1024) -> Array:
    """Weighted mean cross-entropy of ``hidden @ kernel`` against integer ``labels``.

    Args:
      hidden: final hidden states, shape ``(..., d)``.
      kernel: output projection, ``(d, V)``; or ``(V, d)`` with ``transposed=True`` (a tied input
        embedding table, as in GPT-2, used without a transposed copy).
      labels: int array of shape ``hidden.shape[:-1]``, values in ``[0, V)``.
      weights: float array of that shape (default all ones); the loss is ``sum(w * nll) / sum(w)``.
      chunk_size: vocabulary columns of the logits (forward) and of their gradient (backward) made
        at a time: the transient is about ``tokens x chunk_size`` float32 (4 MiB for 1024 tokens).
        Smaller blocks mean more, smaller matmuls.

    Returns a float32 scalar. Logits are accumulated in float32 whatever the input dtype.
    """
    d = hidden.shape[-1]
    d_axis = 1 if transposed else 0
    if kernel.ndim != 2 or kernel.shape[d_axis] != d:
        want = "(V, d)" if transposed else "(d, V)"
        raise ValueError(f"kernel: expected shape {want} with d={d} (hidden's last axis), got {kernel.shape}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels: expected shape {hidden.shape[:-1]} (hidden without its last axis), "
                         f"got {labels.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels: expected an integer dtype, got {labels.dtype}")
    weights = jnp.ones(labels.shape, jnp.float32) if weights is None else weights
    if weights.shape != labels.shape:
        raise ValueError(f"weights: expected shape {labels.shape} (like labels), got {weights.shape}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    return _fused(hidden.reshape(-1, d), kernel, labels.reshape(-1), weights.reshape(-1).astype(jnp.float32),
                  transposed, chunk_size)


def _logits(h: Array, kernel: Array, transposed: bool) -> Array:
    spec = "nd,vd->nv" if transposed else "nd,dv->nv"
    return jnp.einsum(spec, h, kernel, preferred_element_type=jnp.float32)


def _block(kernel: Array, start: Any, width: int, transposed: bool) -> Array:
    """Vocabulary columns ``[start, start + width)`` of the output kernel (rows of a ``(V, d)`` table)."""
    return jax.lax.dynamic_slice_in_dim(kernel, start, width, axis=0 if transposed else 1)


def _forward(h: Array, kernel: Array, labels: Array, weights: Array, transposed: bool,
             chunk_size: int) -> tuple[Array, tuple]:
    """The loss, and the residuals of the backward pass: the logits kept block by block."""
    vocab = kernel.shape[0 if transposed else 1]
    width = min(chunk_size, vocab)
    full, rest = divmod(vocab, width)

    def block_stats(z: Array) -> tuple[Array, Array]:
        top = jnp.max(z, axis=1)
        return top, jnp.sum(jnp.exp(z - top[:, None]), axis=1)

    def one_block(_, start):
        z = _logits(h, _block(kernel, start, width, transposed), transposed)
        return None, (z, *block_stats(z))

    _, (blocks, tops, sums) = jax.lax.scan(one_block, None, jnp.arange(full) * width)
    tail = _logits(h, _block(kernel, full * width, rest, transposed), transposed) if rest else None
    if tail is not None:
        top, total = block_stats(tail)
        tops, sums = jnp.concatenate([tops, top[None]]), jnp.concatenate([sums, total[None]])
    top = jnp.max(tops, axis=0)
    lse = top + jnp.log(jnp.sum(sums * jnp.exp(tops - top), axis=0))
    rows = jnp.arange(labels.shape[0])
    picked = blocks[jnp.minimum(labels // width, full - 1), rows, labels % width]
    if tail is not None:
        picked = jnp.where(labels >= full * width, tail[rows, jnp.clip(labels - full * width, 0, rest - 1)], picked)
    loss = jnp.sum((lse - picked) * weights) / jnp.sum(weights)
    return loss, (h, kernel, labels, weights, blocks, tail, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused(h: Array, kernel: Array, labels: Array, weights: Array, transposed: bool, chunk_size: int) -> Array:
    return _forward(h, kernel, labels, weights, transposed, chunk_size)[0]


def _fused_bwd(transposed, chunk_size, residuals, g):
    h, kernel, labels, weights, blocks, tail, lse = residuals
    full, _, width = blocks.shape
    vocab_axis = 0 if transposed else 1
    coef = (weights * (g / jnp.sum(weights)))[:, None]
    h_k = h.astype(kernel.dtype)  # matmuls in the kernel's dtype, accumulated in float32
    f32 = dict(preferred_element_type=jnp.float32)

    def columns(z, start):
        """dh and dW of the vocabulary columns [start, start + z.shape[1]), from their logits ``z``."""
        onehot = labels[:, None] == start + jnp.arange(z.shape[1])[None, :]
        dz = ((jnp.exp(z - lse[:, None]) - onehot) * coef).astype(kernel.dtype)
        w = _block(kernel, start, z.shape[1], transposed)
        if transposed:
            return jnp.einsum("nv,vd->nd", dz, w, **f32), jnp.einsum("nv,nd->vd", dz, h_k, **f32)
        return jnp.einsum("nv,dv->nd", dz, w, **f32), jnp.einsum("nd,nv->dv", h_k, dz, **f32)

    def one_block(carry, block):
        dh, dkernel = carry
        z, start = block
        dh_c, dw = columns(z, start)
        dkernel = jax.lax.dynamic_update_slice_in_dim(dkernel, dw.astype(kernel.dtype), start, axis=vocab_axis)
        return (dh + dh_c, dkernel), None

    carry = (jnp.zeros(h.shape, jnp.float32), jnp.zeros_like(kernel))
    (dh, dkernel), _ = jax.lax.scan(one_block, carry, (blocks, jnp.arange(full) * width))
    if tail is not None:
        dh_c, dw = columns(tail, full * width)
        dh = dh + dh_c
        dkernel = jax.lax.dynamic_update_slice_in_dim(dkernel, dw.astype(kernel.dtype), full * width, axis=vocab_axis)
    return dh.astype(h.dtype), dkernel, None, None


_fused.defvjp(_forward, _fused_bwd)
