"""LoRA on parameter pytrees: ``init``, ``merge``, ``unmerge``, pure functions over an adapter plan.

For a targeted kernel ``W`` with ``fan_in`` input and ``fan_out`` output features, the adapter is
``lora_a`` of shape ``(fan_in, r)`` and ``lora_b`` of shape ``(r, fan_out)``; the adapted layer acts
as ``W + scale * lora_a @ lora_b`` with ``scale = alpha / r`` (``alpha / sqrt(r)`` with rslora).

Kernels with more than two axes keep their axes in the adapter: leading *stacked* axes (one adapter
per layer of an ``nn.scan`` stack), then input axes, then output axes, e.g. a ``DenseGeneral``
query kernel ``(d, heads, head_dim)`` gets ``lora_a (d, r)``, ``lora_b (r, heads, head_dim)``.
Which axis is which is the :class:`jlora.plan.AdapterPlan`'s business: every verb here builds the
plan (``jlora.plan.make_plan``) and reads it.

A tied weight is one weight: an adapter on an embedding table that a tied LM head also reads
adapts both uses (``apply`` adds it to the lookup and to the head; ``merge`` folds it into the
shared table, which both read).
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jlora.config import LoraConfig
from jlora.plan import KernelLayout, Target, make_plan
from jlora.qformats import is_quantized
from jlora.tree import LORA_KEYS, Tree, adapter_modules, flatten, key_path_str, unflatten

__all__ = ["KernelLayout", "delta", "init", "merge", "unmerge"]


def _init_pair(key: jax.Array, target: Target, mode: bool | str, dtype: Any) -> dict[str, jax.Array]:
    key_a, key_b = jax.random.split(key)
    a_shape, b_shape = target.lora_shapes
    _, fan_in, _ = target.axes
    if target.kind == "embed":  # PEFT draws the non-zero embedding factor from N(0, 1)
        lora_a = jax.random.normal(key_a, a_shape, jnp.float32)
    elif mode == "gaussian":
        lora_a = jax.random.normal(key_a, a_shape, jnp.float32) / target.rank
    else:  # kaiming-uniform with a=sqrt(5), as torch.nn.Linear and PEFT: bound 1/sqrt(fan_in)
        bound = 1.0 / math.sqrt(math.prod(fan_in))
        lora_a = jax.random.uniform(key_a, a_shape, jnp.float32, -bound, bound)
    if mode is False:
        bound = 1.0 / math.sqrt(target.rank)
        lora_b = jax.random.uniform(key_b, b_shape, jnp.float32, -bound, bound)
    else:
        lora_b = jnp.zeros(b_shape, jnp.float32)
    return {"lora_a": lora_a.astype(dtype), "lora_b": lora_b.astype(dtype)}


def _adapter_dtype(kernel_dtype: Any) -> jnp.dtype:
    kernel_dtype = jnp.dtype(kernel_dtype)
    if jnp.issubdtype(kernel_dtype, jnp.floating) and jnp.finfo(kernel_dtype).bits < 32:
        return jnp.dtype(jnp.float32)
    return kernel_dtype


def init(rng: jax.Array, params: Tree, config: LoraConfig, *, model: Any = None, inputs: tuple | None = None,
         dtype: Any = None, layouts: Mapping[str, KernelLayout] | None = None) -> dict[str, Any]:
    """Make the adapter tree for every kernel that ``config.target_modules`` selects.

    Args:
      rng: a ``jax.random`` key; each adapter's key is folded from it and its module path, so
        the result is deterministic and does not depend on which other modules are targeted.
      params: a linen variables dict (``{"params": ...}``) or a bare params dict (HF Flax).
      config: the :class:`LoraConfig`.
      model: optional; the model the params belong to, from which each kernel's axis roles are
        read: an HF Flax model (nothing else needed), or a linen apply function / Module together
        with example ``inputs``. Needed for kernels of more than two axes (``DenseGeneral``,
        ``nn.scan`` stacks); 2-D kernels and embeddings are understood from the params alone.
      inputs: example inputs for a linen ``model`` (a tuple of positional args; shapes matter).
      dtype: dtype of the adapters. Default: float32 over a kernel of a narrower float dtype
        (bfloat16, float16: the adapters are the trained master copies, as PEFT's
        ``autocast_adapter_dtype``), otherwise the kernel's own (float32, float64).
      layouts: ``{module path: KernelLayout}``, explicit axis roles (overrides the model's).

    Returns:
      A tree mirroring ``params`` with only the targeted modules, each
      ``{"lora_a": (*stack, *in, r), "lora_b": (*stack, r, *out)}``; ``lora_b`` is zero (unless
      ``init_lora_weights=False``), so the adapted model equals the base model.

    Raises:
      ValueError: naming the target, pattern or kernel at fault (no match, rank too large, ...).
      TypeError: ``config`` is not a :class:`LoraConfig`.
    """
    plan = make_plan(params, config, model=model, inputs=inputs, layouts=layouts, caller="jlora.init")
    flat = {}
    for target in plan.values():
        key = jax.random.fold_in(rng, zlib.crc32(target.path.encode()))
        pair = _init_pair(key, target, config.init_lora_weights, dtype or _adapter_dtype(target.dtype))
        for name, value in pair.items():
            flat[(*target.key_path[:-1], name)] = value
    return unflatten(flat)


def _fold(params: Tree, lora: Tree, config: LoraConfig, sign: float, caller: str, model: Any, inputs: tuple | None,
          check_finite: bool) -> dict[str, Any]:
    plan = make_plan(params, config, lora=lora, model=model, inputs=inputs, caller=caller)
    flat = flatten(params)
    pairs = adapter_modules(lora)
    for target in plan.values():
        pair = pairs[target.key_path[:-1]]
        update = target.scale * target.delta(pair["lora_a"], pair["lora_b"])
        kernel = flat[target.key_path]
        if is_quantized(kernel):  # a QLoRA base: the merged kernel is float
            kernel = kernel.dequantize()
        folded = kernel.astype(jnp.float32) + sign * update
        if check_finite and not _all_finite(folded):
            bad = "the adapter" if not bool(jnp.isfinite(update).all()) else "the kernel"
            raise ValueError(f"{caller}: folding the adapter into {target.path!r} gives NaN or inf ({bad} holds "
                             "non-finite values); nothing was merged. Check the training run (PEFT's safe_merge "
                             "check), or pass check_finite=False to fold anyway")
        flat[target.key_path] = folded.astype(kernel.dtype)
    return unflatten(flat)


def _all_finite(x: jax.Array) -> bool:
    """``isfinite(x).all()``, or True under tracing (a jitted merge cannot raise on values)."""
    try:
        return bool(jnp.isfinite(x).all())
    except jax.errors.ConcretizationTypeError:
        return True


def merge(params: Tree, lora: Tree, config: LoraConfig, *, model: Any = None, inputs: tuple | None = None,
          check_finite: bool = True) -> dict[str, Any]:
    """Fold every adapter into its kernel: ``W <- W + scale * lora_a @ lora_b``.

    The sum is formed in float32 and cast back to the kernel's dtype. Leaves of ``lora`` other
    than ``lora_a``/``lora_b`` (trained biases, ``modules_to_save``, as made by :func:`jlora.split`)
    replace their counterparts in ``params``, so the result is the whole fine-tuned model.
    ``model`` (optional; a linen one with example ``inputs``) settles a square 2-D kernel's storage
    order: the params alone cannot tell a (d, d) kernel stored (fan_out, fan_in) by a layer such as
    GPT-2's Conv1D, unless a registered rule recognises the tree (``jlora.hf`` does for GPT-2).
    Over a quantized base (:func:`jlora.quantize`, a GGUF file kept quantized) every quantized
    kernel comes back dequantized to float, adapted or not: the merged model is a float model.
    With ``check_finite`` (eager calls), a NaN/inf result is refused with an error naming the
    module, before anything is returned.
    """
    merged = flatten(_fold(params, lora, config, +1.0, "jlora.merge", model, inputs, check_finite))
    merged = {p: leaf.dequantize() if is_quantized(leaf) else leaf for p, leaf in merged.items()}
    for path, leaf in flatten(lora, "lora").items():
        if path[-1] not in LORA_KEYS:
            merged[path] = leaf
    return unflatten(merged)


def unmerge(merged: Tree, lora: Tree, config: LoraConfig, *, model: Any = None, inputs: tuple | None = None,
            check_finite: bool = True) -> dict[str, Any]:
    """Inverse of :func:`merge` for the kernels: ``W <- W - scale * lora_a @ lora_b``.

    Exact up to float rounding of the kernel's dtype. Trained biases and ``modules_to_save``
    stay as they are in ``merged`` (there is no frozen copy to return to). ``merged`` is a float
    model: a quantized base (:func:`jlora.quantize`) is refused, as nothing was merged into it.
    """
    quantized = next(((p, leaf) for p, leaf in flatten(merged).items() if is_quantized(leaf)), None)
    if quantized is not None:
        path, leaf = quantized
        raise ValueError(f"jlora.unmerge: {key_path_str(path)!r} is a quantized kernel ({leaf.format}): "
                         "merged must be a merged float model, and jlora.merge over a quantized base returns a float "
                         "model, never a quantized one; unmerge what jlora.merge returned, or use the quantized base "
                         "as it is (it holds no adapter)")
    return _fold(merged, lora, config, -1.0, "jlora.unmerge", model, inputs, check_finite)


def delta(lora_a: jax.Array, lora_b: jax.Array, kernel_shape: tuple[int, ...], *,
          transposed: bool = False, where: str = "") -> jax.Array:
    """``lora_a @ lora_b`` (unscaled, float32) reshaped to ``kernel_shape``.

    ``lora_a: (*stack, *in, r)``, ``lora_b: (*stack, r, *out)``, kernel ``(*stack, *in, *out)``
    (``(*stack, out, in)`` when ``transposed``); the axis counts follow from the three ranks.
    """
    n_stack = lora_a.ndim + lora_b.ndim - 2 - len(kernel_shape)
    n_in = lora_a.ndim - 1 - n_stack
    layout = KernelLayout(stack_dims=max(n_stack, 0), in_dims=max(n_in, 1), transposed=transposed)
    target = Target(path=where, key_path=(), kind="dense", layer="", shape=tuple(kernel_shape), dtype="float32",
                    layout=layout, rank=int(lora_a.shape[-1]), alpha=1.0, scale=1.0)
    return target.delta(lora_a, lora_b)
