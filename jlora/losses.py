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

and its backward pass walks the tokens in chunks of ``chunk_size`` rows,

    dz_c = (softmax(z_c) - onehot(y_c)) * w_c * g / sum(w),   dh_c = dz_c @ W^T,   dW += h_c^T @ dz_c,

so the gradient of the logits only ever exists one ``(chunk_size, V)`` block at a time. The logits
are saved from the forward pass, never recomputed: the FLOPs are those of the unfused recipe.
When ``W`` is frozen (LoRA with the head not adapted) the ``dW`` accumulation is dead code that
XLA removes.

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
                          transposed: bool = False, chunk_size: int = 128) -> Array:
    """Weighted mean cross-entropy of ``hidden @ kernel`` against integer ``labels``.

    Args:
      hidden: final hidden states, shape ``(..., d)``.
      kernel: output projection, ``(d, V)``; or ``(V, d)`` with ``transposed=True`` (a tied input
        embedding table, as in GPT-2, used without a transposed copy).
      labels: int array of shape ``hidden.shape[:-1]``, values in ``[0, V)``.
      weights: float array of that shape (default all ones); the loss is ``sum(w * nll) / sum(w)``.
      chunk_size: rows of ``exp(logits)`` (forward) and of the logits gradient (backward) formed at
        a time: the transient is ``chunk_size x V`` float32. Each chunk reads the whole kernel once,
        and a full fine-tune adds each chunk's ``dW`` into a float32 accumulator, so small chunks
        cost time (measured on 2 CPU cores, GPT-2 W1: 128 as fast as the unfused loss, 32 as fast
        for LoRA but 20% slower for a full fine-tune).

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


def _loss(logits: Array, labels: Array, weights: Array, chunk_size: int) -> tuple[Array, Array]:
    """(weighted mean NLL, logsumexp per row); the logsumexp runs over row chunks so that its
    ``exp(z - max)`` exists one ``(chunk_size, V)`` block at a time, not as a second logits tensor."""
    n = logits.shape[0]
    chunk = min(chunk_size, n)
    pad = -n % chunk
    padded = jnp.pad(logits, [(0, pad), (0, 0)]) if pad else logits
    lse = jax.lax.map(lambda z: jax.nn.logsumexp(z, axis=-1), padded.reshape(-1, chunk, logits.shape[1]))
    lse = lse.reshape(-1)[:n]
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
    chunk = min(chunk_size, n)
    pad = -n % chunk
    if pad:  # padded rows have weight 0, so they add nothing to dh or dW
        h, labels, weights, logits, lse = (jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
                                           for a in (h, labels, weights, logits, lse))
    scale = g / jnp.sum(weights)

    def one_chunk(dkernel, start):
        rows = lambda a: jax.lax.dynamic_slice_in_dim(a, start, chunk, axis=0)  # noqa: E731
        z, y, w, m, hc = rows(logits), rows(labels), rows(weights), rows(lse), rows(h)
        dz = (jnp.exp(z - m[:, None]) - jax.nn.one_hot(y, vocab, dtype=jnp.float32)) * (w * scale)[:, None]
        dz = dz.astype(kernel.dtype)  # matmuls in the kernel's dtype, accumulated in float32
        f32 = dict(preferred_element_type=jnp.float32)
        if transposed:
            dh = jnp.einsum("nv,vd->nd", dz, kernel, **f32)
            dkernel = dkernel + jnp.einsum("nv,nd->vd", dz, hc.astype(kernel.dtype), **f32)
        else:
            dh = jnp.einsum("nv,dv->nd", dz, kernel, **f32)
            dkernel = dkernel + jnp.einsum("nd,nv->dv", hc.astype(kernel.dtype), dz, **f32)
        return dkernel, dh.astype(h.dtype)

    starts = jnp.arange(0, n + pad, chunk)
    dkernel, dh = jax.lax.scan(one_chunk, jnp.zeros(kernel.shape, jnp.float32), starts)
    dh = dh.reshape(-1, h.shape[-1])[:n]
    return dh, dkernel.astype(kernel.dtype), None, None


_fused.defvjp(_fused_fwd, _fused_bwd)
