"""Next-token cross-entropy fused with the output projection, at the memory of one logits tensor.

For a language model the logits ``(tokens, vocab)`` dwarf every other activation (GPT-2: 8x128
tokens x 50257 float32 = 196 MiB, more than all of GPT-2 small's layer activations taken together
at that batch). The plain recipe ``optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1],
ids[:, 1:])`` holds up to three tensors of that size at once: the logits, their shifted copy (the
slice ``[:, :-1]`` is a copy) and the gradient of the logits (with a transposed copy of it for the
output kernel's gradient in a full fine-tune). :func:`lm_head_cross_entropy` keeps only the logits
themselves: with ``h`` the final hidden states ``(N, d)``, ``W`` the output kernel ``(d, V)``,
labels ``y`` and weights ``w`` (0 for positions that have no next token),

    z = h @ W,    loss = sum_n w_n (logsumexp(z_n) - z_{n, y_n}) / sum_n w_n,

and its backward pass walks the vocabulary in blocks ``c`` of ``chunk_size`` columns,

    dz_c = (softmax(z)_c - onehot(y)_c) * w * g / sum(w),   dh += dz_c @ W_c^T,   dW_c = h^T @ dz_c,

so the gradient of the logits only ever exists one ``(N, chunk_size)`` block at a time, each block
of ``dW`` is written once (no accumulator of ``W``'s size is read and written per block), and the
only running sum is ``dh`` ``(N, d)``. The forward logsumexp likewise runs over row blocks of about
``N x chunk_size`` elements. The logits are saved from the forward pass, never recomputed: the
FLOPs are those of the unfused recipe. When ``W`` is frozen (LoRA with the head not adapted) the
``dW`` blocks are dead code that XLA removes.

The projection is applied here, so the model must hand over its final hidden states (for Hugging
Face models: ``output_hidden_states=True`` and ``.hidden_states[-1]``; the unused logits of the
model call are then removed by XLA). Do not use it when the output projection itself carries a
LoRA adapter: the adapter would be bypassed.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def next_token_targets(ids: Array) -> tuple[Array, Array]:
    """``(labels, weights)`` for next-token prediction over ``ids`` of shape ``(batch, seq)``.

    ``labels[:, t] = ids[:, t + 1]`` and the last position, which has no next token, gets label 0
    and weight 0, so that the logits need no ``[:, :-1]`` slice (a full copy of them).
    """
    if ids.ndim != 2:
        raise ValueError(f"ids: expected shape (batch, seq), got {ids.shape}")
    labels = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
    weights = jnp.ones(ids.shape, jnp.float32).at[:, -1].set(0.0)
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
      chunk_size: vocabulary columns of the logits gradient formed at a time (backward), and the
        forward's logsumexp block of about ``tokens x chunk_size`` elements: the transient is about
        ``tokens x chunk_size`` float32 (4 MiB for 1024 tokens). Smaller blocks mean more, smaller
        matmuls.

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
