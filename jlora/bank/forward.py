"""The bank's forward pass: each example through its own adapter (:func:`apply`), in one batch.

``y[b] = x[b] @ W + scale[ids[b]] * (x[b] @ A[ids[b]]) @ B[ids[b]]``: see :mod:`jlora.bank`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora.bank.slots import BANK_KEYS, BASE, AdapterBank, _leaf, select
from jlora.layerkinds import as_function, checked_axes, first_input, is_adaptable
from jlora.layers import add_delta, compute_dtype, layer_dropout, place_slices
from jlora.qlayers import inside_dequantized_call, quantized_layers
from jlora.tree import COLLECTION, Tree, combine, unflatten


def bank_delta(x: jax.Array, lora_a: jax.Array, lora_b: jax.Array, scale: jax.Array, *, axes: Sequence[int] = (-1,),
               slices: Sequence[bool] | None = None) -> jax.Array:
    """The low-rank path with one adapter per example (axis 0 of ``x`` is the batch).

    Args:
      x: ``(batch, ..., *fan_in)``; the ``axes`` (fan_in axes) are contracted.
      lora_a: ``(batch, *fan_in, R)`` (fused: ``(batch, n_enabled, fan_in, R)``), each example's ``A``.
      lora_b: ``(batch, R, *fan_out)`` (fused: ``(batch, n_enabled, R, slice)``).
      scale: ``(batch,)``: each example's ``alpha / r`` (0: no adapter).

    Returns:
      ``scale[b] * (x[b] @ lora_a[b]) @ lora_b[b]``, shaped ``(batch, ..., *fan_out)`` (fused: the
      ``len(slices) * slice`` output features, zeros in the disabled slices).
    """
    dtype = compute_dtype(x, lora_a)
    x, lora_a, lora_b = x.astype(dtype), lora_a.astype(dtype), lora_b.astype(dtype)
    if slices is not None:
        hidden = jnp.einsum("b...i,beir->b...er", x, lora_a)
        hidden = hidden * scale.astype(dtype).reshape((-1,) + (1,) * (hidden.ndim - 1))
        return place_slices(jnp.einsum("b...er,bero->b...eo", hidden, lora_b), slices)
    axes = tuple(sorted(a % x.ndim for a in axes))
    if 0 in axes:
        raise ValueError("bank_delta: the layer contracts axis 0, which adapter banks take as the batch axis")
    hidden = jax.lax.dot_general(x, lora_a, ((axes, tuple(range(1, 1 + len(axes)))), ((0,), (0,))))
    hidden = hidden * scale.astype(dtype).reshape((-1,) + (1,) * (hidden.ndim - 1))
    return jax.lax.dot_general(hidden, lora_b, (((hidden.ndim - 1,), (1,)), ((0,), (0,))))


def _gather(leaves: tuple[jax.Array, jax.Array, jax.Array], ids: jax.Array) -> tuple[jax.Array, ...]:
    """``(A[ids], B[ids], scale[ids])`` along the slot axis (axis 0); scale 0 where ``ids == -1`` (the base)
    and NaN where ``ids`` lies outside ``[-1, N)`` (unchecked under jit: the row's outputs become NaN)."""
    size = leaves[2].shape[0]
    slot = jnp.clip(ids, 0, size - 1)
    lora_a, lora_b, scale = (jnp.take(leaf, slot, axis=0) for leaf in leaves)
    scale = jnp.where(ids >= 0, scale, jnp.zeros_like(scale))
    return lora_a, lora_b, jnp.where((ids >= BASE) & (ids < size), scale, jnp.full_like(scale, jnp.nan))


def rows(bank: AdapterBank, adapter_ids: Any) -> AdapterBank:
    """A bank whose slot ``b`` is adapter ``adapter_ids[b]`` (zeros, scale 0 for ``-1``): the gather done once.

    ``apply(fn)(params, rows(bank, ids), None, x)`` equals ``apply(fn)(params, bank, ids, x)`` (a bank of
    rows takes ``adapter_ids=None``; one of adapters requires ids); a sampler
    that runs the model once per generated token gathers each row's factors once instead of every step.
    """
    ids = select(bank, adapter_ids)
    factors, scales = {}, {}
    for rec in bank.targets:
        pair = _leaf(bank.factors, rec.module_key)
        scale = _leaf(bank.scales, rec.module_key)
        moved = [jnp.moveaxis(pair[k], rec.stack_dims, 0) for k in ("lora_a", "lora_b")]
        a, b, scale = _gather((*moved, scale), ids)
        factors[(*rec.module_key, "lora_a")] = jnp.moveaxis(a, 0, rec.stack_dims)
        factors[(*rec.module_key, "lora_b")] = jnp.moveaxis(b, 0, rec.stack_dims)
        scales[rec.module_key] = scale
    ranks = {rec.module_key: jnp.where(ids >= 0, jnp.take(_leaf(bank.ranks, rec.module_key), jnp.clip(ids, 0, None)), 0)
             for rec in bank.targets}
    return bank.replace(factors=unflatten(factors), scales=unflatten(scales), ranks=unflatten(ranks), per_row=True)


class _BankInterceptor:
    """Adds each example's adapter to the layers that hold ``bank_a``/``bank_b``/``bank_scale``."""

    def __init__(self, bank: AdapterBank, ids: jax.Array, rate: float, dropout_rng: str):
        self.ids, self.rate, self.dropout_rng, self.per_row = ids, rate, dropout_rng, bank.per_row
        self.slices = {rec.path: rec.slices for rec in bank.targets}
        self.used: set[str] = set()

    def __call__(self, next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        module = context.module
        if inside_dequantized_call() or context.method_name != "__call__" or not is_adaptable(module) \
                or not module.has_variable(COLLECTION, "bank_a"):
            return next_fun(*args, **kwargs)
        path = "/".join(module.path)
        base = next_fun(*args, **kwargs)
        x = first_input(args, kwargs)
        if x.shape[0] != self.ids.shape[0]:
            raise ValueError(f"jlora.bank.apply: the layer at {path!r} got inputs of shape {tuple(x.shape)}, whose "
                             f"axis 0 (taken as the batch) is not the {self.ids.shape[0]} adapter_ids given")
        x = layer_dropout(module, x, self.rate, self.dropout_rng)
        lora_a, lora_b, scale = (module.get_variable(COLLECTION, k) for k in BANK_KEYS)
        axes = checked_axes(module, x, lora_a, f"jlora.bank.apply: the layer at {path!r} contracts inputs of shape "
                            "{fan_in} but the bank's factors there are {shape} (slots first); was the bank stacked for "
                            "another model?")
        if not self.per_row:
            lora_a, lora_b, scale = _gather((lora_a, lora_b, scale), self.ids)
        self.used.add(path)
        return add_delta(base, bank_delta(x, lora_a, lora_b, scale, axes=axes,
                                          slices=self.slices.get(path)))


def overlay(bank: AdapterBank) -> dict[str, Any]:
    """The bank as params leaves next to each kernel: ``bank_a``, ``bank_b``, ``bank_scale (*stack, N)``."""
    flat = {}
    for rec in bank.targets:
        pair = _leaf(bank.factors, rec.module_key)
        a = pair["lora_a"]
        flat[(*rec.module_key, "bank_a")] = a
        flat[(*rec.module_key, "bank_b")] = pair["lora_b"]
        flat[(*rec.module_key, "bank_scale")] = jnp.broadcast_to(_leaf(bank.scales, rec.module_key),
                                                                 a.shape[:rec.stack_dims + 1])
    return unflatten(flat)


class BankApply:
    """``f(params, bank, adapter_ids, *args, **kwargs)``: ``fn`` with example ``b`` through adapter ``adapter_ids[b]``."""

    def __init__(self, fn: Callable, *, lora_dropout: float = 0.0, dropout_rng: str = "dropout"):
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"jlora.bank.apply: lora_dropout must lie in [0, 1), got {lora_dropout!r}")
        self.fn, self.rate, self.dropout_rng = as_function(fn, "jlora.bank.apply"), lora_dropout, dropout_rng

    def __call__(self, params: Tree, bank: AdapterBank, adapter_ids: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(bank, AdapterBank):
            raise TypeError(f"jlora.bank.apply: bank must be a jlora.bank.AdapterBank (jlora.bank.stack), got "
                            f"{type(bank).__name__}")
        if bank.per_row != (adapter_ids is None):
            raise ValueError("jlora.bank.apply: adapter_ids is required (one slot id per example, -1 for the base)"
                             if not bank.per_row else "jlora.bank.apply: this bank is one slot per example "
                             "(jlora.bank.rows): pass adapter_ids=None")
        ids = jnp.arange(bank.size, dtype=jnp.int32) if bank.per_row else select(bank, adapter_ids)
        interceptor = _BankInterceptor(bank, ids, self.rate, self.dropout_rng)
        with nn.intercept_methods(interceptor), quantized_layers():
            out = self.fn(combine(params, overlay(bank)), *args, **kwargs)
        unused = sorted({rec.path for rec in bank.targets} - interceptor.used)
        if unused:
            raise ValueError(f"jlora.bank.apply: the bank's kernels {unused} were never used: no Dense-like call with "
                             "those paths ran inside fn; was the bank stacked for another model?")
        return out


def apply(fn: Callable, *, lora_dropout: float = 0.0, dropout_rng: str = "dropout") -> BankApply:
    """Wrap ``fn`` (``module.apply`` or an HF Flax model) as ``f(params, bank, adapter_ids, *args, **kwargs)``.

    Example ``b`` of the batch (axis 0 of every adapted layer's input) runs through
    ``jlora.merge(params, *take(bank, adapter_ids[b]))`` (``-1``: the base), in one pass, never
    merged. LoRA dropout (``lora_dropout``) is active when ``fn`` gets an rng for ``dropout_rng``.
    ``adapter_ids=None`` for a bank that is already one slot per example (:func:`rows`): no gather.
    """
    return BankApply(fn, lora_dropout=lora_dropout, dropout_rng=dropout_rng)
