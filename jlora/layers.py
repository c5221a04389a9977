"""The LoRA forward pass, and a drop-in linen layer built on it.

Every function here adds the low-rank path to an already computed base output and never forms
``W + scale * A @ B``: for inputs ``x`` of shape ``(..., fan_in)``,

    y = x @ W (+ bias) + ((dropout(x) @ lora_a) * scale) @ lora_b,

the scale applied to the ``(tokens, r)`` hidden rather than to the ``(tokens, fan_out)`` output: the
same product, but the backward pass then needs no ``(tokens, fan_out)`` multiply, and XLA:CPU no
transposed copy of the output gradient for ``lora_b``'s gradient (10-13% of a LoRA layer's train
time at GPT-2 and MiniLM shapes; BENCHMARKS.md, issue 11).

which costs ``O(tokens * r * (fan_in + fan_out))`` extra FLOPs and an ``(tokens, r)`` activation,
and whose backward pass yields gradients for ``lora_a`` (fan_in, r) and ``lora_b`` (r, fan_out)
without a (fan_in, fan_out) gradient for ``W``. The low-rank path is computed in the promoted
dtype of the input and the adapter (float32 adapters over a bfloat16 base stay float32) and cast
to the base output's dtype before the sum.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def dropout(x: Array, rate: float, rng: Array | None) -> Array:
    """Inverted dropout: zero each entry with probability ``rate``, scale the rest by 1/(1-rate).

    Identity when ``rate == 0`` or ``rng is None`` (evaluation).
    """
    if rate == 0.0 or rng is None:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def layer_dropout(module: nn.Module, x: Array, rate: float, stream: str) -> Array:
    """:func:`dropout` inside a linen layer: active when ``rate > 0`` and the call has an rng for ``stream``."""
    rng = module.make_rng(stream) if rate > 0.0 and module.has_rng(stream) else None
    return dropout(x, rate, rng)


def compute_dtype(x: Array, lora_a: Array) -> Any:
    return jnp.promote_types(x.dtype, lora_a.dtype) if jnp.issubdtype(x.dtype, jnp.inexact) \
        else lora_a.dtype


def dense_delta(x: Array, lora_a: Array, lora_b: Array, scale: float, *,
                axis: Sequence[int] = (-1,), precision: Any = None) -> Array:
    """``scale * (x ·_axis lora_a) @ lora_b`` for a ``Dense``/``DenseGeneral`` layer.

    Args:
      x: inputs; the axes in ``axis`` (fan_in axes, in order) are contracted.
      lora_a: ``(*fan_in_shape, r)``.
      lora_b: ``(r, *fan_out_shape)``.
      scale: ``alpha / r``.
      axis: the input axes the layer contracts (``DenseGeneral.axis``; ``(-1,)`` for ``Dense``).

    Returns:
      ``(*x's other axes in order, *fan_out_shape)``, the layout ``DenseGeneral`` produces.
    """
    axes = tuple(sorted(a % x.ndim for a in axis))
    dtype = compute_dtype(x, lora_a)
    hidden = jax.lax.dot_general(x.astype(dtype), lora_a.astype(dtype),
                                 ((axes, tuple(range(len(axes)))), ((), ())), precision=precision)
    return jnp.tensordot(hidden * jnp.asarray(scale, dtype), lora_b.astype(dtype), axes=1, precision=precision)


def fused_dense_delta(x: Array, lora_a: Array, lora_b: Array, scale: float, mask: Sequence[bool], *,
                      precision: Any = None) -> Array:
    """The low-rank path of a fused projection (loralib's ``MergedLinear``).

    ``lora_a: (n_enabled, fan_in, r)``, ``lora_b: (n_enabled, r, slice)``; the output
    ``(..., len(mask) * slice)`` holds ``scale * (x @ A_i) @ B_i`` in each enabled slice, zeros elsewhere.
    """
    dtype = compute_dtype(x, lora_a)
    hidden = jnp.einsum("...i,eir->...er", x.astype(dtype), lora_a.astype(dtype), precision=precision)
    parts = jnp.einsum("...er,ero->...eo", hidden * jnp.asarray(scale, dtype), lora_b.astype(dtype),
                       precision=precision)
    return place_slices(parts, mask)


def place_slices(parts: Array, mask: Sequence[bool]) -> Array:
    """``parts (..., n_enabled, slice)`` laid out as a fused output ``(..., len(mask) * slice)``: each
    enabled slice in its place, zeros in the disabled ones."""
    zeros = jnp.zeros(parts.shape[:-2] + parts.shape[-1:], parts.dtype)
    slots = iter(range(parts.shape[-2]))
    return jnp.concatenate([parts[..., next(slots), :] if on else zeros for on in mask], axis=-1)


def embed_delta(ids: Array, lora_a: Array, lora_b: Array, scale: float) -> Array:
    """``scale * lora_a[ids] @ lora_b`` for an embedding lookup; ``lora_a: (vocab, r)``."""
    rows = jnp.take(lora_a, ids, axis=0)
    return (rows * jnp.asarray(scale, lora_a.dtype)) @ lora_b


def attend_delta(query: Array, lora_a: Array, lora_b: Array, scale: float) -> Array:
    """``scale * (query @ lora_b.T) @ lora_a.T``: the low-rank part of ``Embed.attend``.

    ``Embed.attend(q) = q @ E.T``; with ``E + scale * A @ B`` that adds ``scale * q @ B.T @ A.T``.
    """
    dtype = compute_dtype(query, lora_a)
    hidden = query.astype(dtype) @ lora_b.astype(dtype).T
    return (hidden * jnp.asarray(scale, dtype)) @ lora_a.astype(dtype).T


def add_delta(base: Array, delta: Array) -> Array:
    """``base + delta`` in ``base``'s dtype (the base output keeps its precision)."""
    return base + delta.astype(base.dtype)


def kaiming_uniform_a(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
    """``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` over ``shape = (*fan_in, r)``: PEFT's ``lora_A`` init."""
    bound = 1.0 / math.sqrt(math.prod(shape[:-1]))
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class LoraDense(nn.Module):
    """``nn.Dense`` with a built-in LoRA path, for models you write yourself.

    Params (one module dict, the same layout :func:`jlora.apply` uses): ``kernel (fan_in,
    features)``, ``bias (features,)``, ``lora_a (fan_in, r)``, ``lora_b (r, features)``.
    ``jlora.partition(variables)`` splits them into ``(params, lora)`` for training and merging.

    Output: ``x @ kernel + bias + (lora_alpha / r) * (dropout(x) @ lora_a) @ lora_b``; dropout is
    active when ``lora_dropout > 0`` and ``deterministic`` is False (attribute or call argument,
    as ``nn.Dropout``), with the ``"dropout"`` rng stream.
    """

    features: int
    r: int = 8
    lora_alpha: float = 8.0
    use_rslora: bool = False
    lora_dropout: float = 0.0
    deterministic: bool | None = None
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    lora_dtype: Any = None
    precision: Any = None
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()

    @property
    def scale(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @nn.compact
    def __call__(self, inputs: Array, deterministic: bool | None = None) -> Array:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraDense.r: expected a positive integer rank, got {self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraDense.lora_dropout: expected a rate in [0, 1), got {self.lora_dropout!r}")
        if not self.lora_alpha > 0:
            raise ValueError(f"LoraDense.lora_alpha: expected a number > 0, got {self.lora_alpha!r}")
        fan_in = jnp.shape(inputs)[-1]
        if self.r > min(fan_in, self.features):
            raise ValueError(f"LoraDense.r: rank {self.r} exceeds min(fan_in, features) = "
                             f"{min(fan_in, self.features)} of {'/'.join(self.path)!r}")
        lora_dtype = self.lora_dtype or self.param_dtype
        kernel = self.param("kernel", self.kernel_init, (fan_in, self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) \
            if self.use_bias else None
        lora_a = self.param("lora_a", kaiming_uniform_a, (fan_in, self.r), lora_dtype)
        lora_b = self.param("lora_b", nn.initializers.zeros_init(), (self.r, self.features), lora_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision)
        if bias is not None:
            y = y + bias
        rng = None
        if self.lora_dropout > 0.0 and not nn.merge_param("deterministic", self.deterministic,
                                                          deterministic):
            rng = self.make_rng("dropout")
        return add_delta(y, dense_delta(dropout(inputs, self.lora_dropout, rng), lora_a, lora_b,
                                        self.scale, precision=self.precision))
