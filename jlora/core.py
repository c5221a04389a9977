"""LoRA on parameter pytrees: ``init``, ``merge``, ``unmerge``, pure functions.

For a targeted kernel ``W`` with ``fan_in`` input and ``fan_out`` output features, the adapter is
``lora_a`` of shape ``(fan_in, r)`` and ``lora_b`` of shape ``(r, fan_out)``; the adapted layer acts
as ``W + scale * lora_a @ lora_b`` with ``scale = alpha / r`` (``alpha / sqrt(r)`` with rslora).

Kernels with more than two axes are described by a :class:`KernelLayout`: leading *stacked* axes
(one adapter per layer of an ``nn.scan``/``nn.vmap`` stack), then the input axes, then the output
axes, e.g. a ``DenseGeneral`` query kernel ``(d, heads, head_dim)`` has one input axis and an
output projection ``(heads, head_dim, d)`` has two. Its adapter keeps those axes:
``lora_a: (*stack, *in, r)``, ``lora_b: (*stack, r, *out)``. The layout of a 2-D kernel is implied;
for others pass ``layouts`` to :func:`init`, most simply from :func:`jlora.find_layouts`, which
reads it off the model. ``merge`` needs no layout: it follows from the three shapes.
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jlora.config import LoraConfig, _preview, in_module, path_ends_with
from jlora.tree import (KERNEL_KEYS, LORA_KEYS, KeyPath, Tree, adapter_modules, flatten,
                        is_variables_dict, kernel_paths, key_path_str, module_path, unflatten)


@dataclasses.dataclass(frozen=True)
class KernelLayout:
    """Axis roles of a kernel: ``(*stack, *in, *out)``, or ``(*stack, out, in)`` if transposed.

    Attributes:
      stack_dims: leading axes that index stacked layers (``nn.scan``), one adapter each.
      in_dims: input (contracted) axes after the stacked ones; the rest are output axes.
      transposed: stored (fan_out, fan_in) as GPT-2's ``FlaxConv1D`` (one in and one out axis).
    """

    stack_dims: int = 0
    in_dims: int = 1
    transposed: bool = False

    def split(self, shape: tuple[int, ...], where: str) -> tuple[tuple[int, ...], ...]:
        """``(stack_shape, in_shape, out_shape)`` of a kernel ``shape``, checked against the layout."""
        out_dims = len(shape) - self.stack_dims - self.in_dims
        if self.stack_dims < 0 or self.in_dims < 1 or out_dims < 1 or \
                (self.transposed and (self.in_dims, out_dims) != (1, 1)):
            raise ValueError(f"layouts[{where!r}]: {self} does not fit a kernel of shape {shape}: "
                             "it needs at least one input and one output axis after the stacked ones "
                             "(exactly one each when transposed)")
        stack, rest = shape[:self.stack_dims], shape[self.stack_dims:]
        if self.transposed:
            return stack, rest[1:], rest[:1]
        return stack, rest[:self.in_dims], rest[self.in_dims:]


def _resolve_layout(mpath: str, leaf_name: str, kernel: Any, config: LoraConfig,
                    layouts: Mapping[str, KernelLayout] | None) -> KernelLayout:
    if layouts is not None and mpath in layouts:
        return layouts[mpath]
    if kernel.ndim == 2:
        return KernelLayout(transposed=config.fan_in_fan_out and leaf_name == "kernel")
    raise ValueError(
        f"kernel at {mpath!r} has shape {tuple(kernel.shape)}: with more than two axes it may be a "
        "DenseGeneral kernel or a stack of scanned layers, and the shape alone cannot tell. Pass "
        "layouts=jlora.find_layouts(fn, params, *example_inputs) (reads it off the model) or "
        f"layouts={{{mpath!r}: jlora.KernelLayout(stack_dims=..., in_dims=...)}}")


def _init_pair(key: jax.Array, stack: tuple, fan_in: tuple, fan_out: tuple, rank: int,
               is_embedding: bool, mode: bool | str, dtype: Any) -> dict[str, jax.Array]:
    key_a, key_b = jax.random.split(key)
    a_shape, b_shape = (*stack, *fan_in, rank), (*stack, rank, *fan_out)
    if is_embedding:  # PEFT draws the non-zero embedding factor from N(0, 1)
        lora_a = jax.random.normal(key_a, a_shape, jnp.float32)
    elif mode == "gaussian":
        lora_a = jax.random.normal(key_a, a_shape, jnp.float32) / rank
    else:  # kaiming-uniform with a=sqrt(5), as torch.nn.Linear and PEFT: bound 1/sqrt(fan_in)
        bound = 1.0 / math.sqrt(math.prod(fan_in))
        lora_a = jax.random.uniform(key_a, a_shape, jnp.float32, -bound, bound)
    if mode is False:
        bound = 1.0 / math.sqrt(rank)
        lora_b = jax.random.uniform(key_b, b_shape, jnp.float32, -bound, bound)
    else:
        lora_b = jnp.zeros(b_shape, jnp.float32)
    return {"lora_a": lora_a.astype(dtype), "lora_b": lora_b.astype(dtype)}


def init(rng: jax.Array, params: Tree, config: LoraConfig, *, dtype: Any = None,
         layouts: Mapping[str, KernelLayout] | None = None) -> dict[str, Any]:
    """Make the adapter tree for every kernel that ``config.target_modules`` selects.

    Args:
      rng: a ``jax.random`` key; each adapter's key is folded from it and its module path, so
        the result is deterministic and does not depend on which other modules are targeted.
      params: a linen variables dict (``{"params": ...}``) or a bare params dict (HF Flax).
      config: the :class:`LoraConfig`.
      dtype: dtype of the adapters (default: each kernel's own), e.g. ``jnp.float32`` adapters
        over a ``bfloat16`` base.
      layouts: ``{module path: KernelLayout}`` for kernels with more than two axes.

    Returns:
      A tree mirroring ``params`` with only the targeted modules, each
      ``{"lora_a": (*stack, *in, r), "lora_b": (*stack, r, *out)}``; ``lora_b`` is zero (unless
      ``init_lora_weights=False``), so the adapted model equals the base model.

    Raises:
      ValueError: naming the target, pattern or kernel at fault (no match, rank too large, ...).
    """
    in_vars = is_variables_dict(params)
    kernels = kernel_paths(params)
    by_module = {module_path(path, in_vars): path for path in kernels}
    chosen = {m: p for m, p in by_module.items() if config.is_target(m)}
    all_modules = {module_path(p, in_vars) for p in flatten(params)
                   if not in_vars or p[0] == "params"}
    _check_targets(config, by_module, chosen, all_modules)
    config.check_patterns_used(chosen)
    flat = {}
    for mpath, path in chosen.items():
        kernel = kernels[path]
        stack, fan_in, fan_out = _resolve_layout(mpath, path[-1], kernel, config, layouts).split(
            tuple(kernel.shape), mpath)
        mask = config.slices_for(mpath)
        if mask is not None:
            stack, fan_out = _fused_shapes(mpath, stack, fan_in, fan_out, mask)
        rank = config.rank_for(mpath)
        limit = min(math.prod(fan_in), math.prod(fan_out))
        if rank > limit:
            source = "rank_pattern" if rank != config.r else "r"
            raise ValueError(f"LoraConfig.{source}: rank {rank} exceeds min(fan_in, fan_out) = {limit} of "
                             f"{mpath!r} (kernel {tuple(kernel.shape)}, fan_in {fan_in}, fan_out {fan_out}"
                             f"{' per fused slice' if mask else ''})")
        key = jax.random.fold_in(rng, zlib.crc32(mpath.encode()))
        pair = _init_pair(key, stack, fan_in, fan_out, rank, path[-1] == "embedding",
                          config.init_lora_weights, dtype or kernel.dtype)
        for name, value in pair.items():
            flat[(*path[:-1], name)] = value
    return unflatten(flat)


def _fused_shapes(mpath: str, stack: tuple, fan_in: tuple, fan_out: tuple,
                  mask: tuple[bool, ...]) -> tuple[tuple, tuple]:
    """Stack and per-slice fan_out of a fused projection: one adapter per enabled slice."""
    if len(fan_in) != 1 or len(fan_out) != 1 or fan_out[0] % len(mask):
        raise ValueError(f"LoraConfig.enable_lora: {mpath!r} has fan_in {fan_in} and fan_out {fan_out}, which "
                         f"do not split into {len(mask)} equal output slices")
    return (*stack, sum(mask)), (fan_out[0] // len(mask),)


def _check_targets(config: LoraConfig, by_module: Mapping[str, KeyPath],
                   chosen: Mapping[str, KeyPath], all_modules: set[str]) -> None:
    seen = sorted({m.rsplit("/", 1)[-1] for m in by_module})
    if isinstance(config.target_modules, str):
        if not chosen:
            raise ValueError(f"LoraConfig.target_modules: regex {config.target_modules!r} fully matches no "
                             f"module path holding a kernel; paths seen: {_preview(sorted(by_module))}")
    else:
        for name in config.target_modules:
            if not any(path_ends_with(m, name) for m in by_module):
                raise ValueError(f"LoraConfig.target_modules: {name!r} matches no module holding a kernel; "
                                 f"module names seen: {_preview(seen)}")
    for name in config.modules_to_save:
        if not any(in_module(m, name) for m in all_modules):
            names = sorted({n for m in all_modules for n in m.split("/")})
            raise ValueError(f"LoraConfig.modules_to_save: {name!r} matches no module; module names seen: "
                             f"{_preview(names)}")


def adapter_scale(config: LoraConfig, mpath: str, lora_a: Any) -> float:
    """``alpha / r`` for the adapter at ``mpath``, checking its rank against the config."""
    rank = lora_a.shape[-1]
    expected = config.rank_for(mpath)
    if rank != expected:
        raise ValueError(f"lora at {mpath!r} has rank {rank} but the config gives rank {expected}: "
                         "was the adapter made with another LoraConfig?")
    return config.scale_for(mpath, rank)


def delta(lora_a: jax.Array, lora_b: jax.Array, kernel_shape: tuple[int, ...], *,
          transposed: bool = False, where: str = "") -> jax.Array:
    """``lora_a @ lora_b`` (unscaled, float32) reshaped to ``kernel_shape``.

    ``lora_a: (*stack, *in, r)``, ``lora_b: (*stack, r, *out)``, kernel ``(*stack, *in, *out)``
    (``(*stack, out, in)`` when ``transposed``); the axis counts follow from the three ranks.
    """
    n_stack = lora_a.ndim + lora_b.ndim - 2 - len(kernel_shape)
    n_in, n_out = lora_a.ndim - 1 - n_stack, lora_b.ndim - 1 - n_stack
    stack = lora_a.shape[:n_stack]
    fan_in, rank, fan_out = lora_a.shape[n_stack:-1], lora_a.shape[-1], lora_b.shape[n_stack + 1:]
    expected = (*stack, *(fan_out + fan_in if transposed else fan_in + fan_out))
    if n_stack < 0 or n_in < 1 or n_out < 1 or lora_b.shape[:n_stack + 1] != (*stack, rank) \
            or tuple(kernel_shape) != expected:
        raise ValueError(f"lora at {where!r}: lora_a {tuple(lora_a.shape)} and lora_b {tuple(lora_b.shape)} "
                         f"do not fit the kernel {tuple(kernel_shape)}; expected lora_a (*stack, *fan_in, r) "
                         f"and lora_b (*stack, r, *fan_out){' for a transposed kernel' if transposed else ''}")
    a = lora_a.astype(jnp.float32).reshape(*stack, math.prod(fan_in), rank)
    b = lora_b.astype(jnp.float32).reshape(*stack, rank, math.prod(fan_out))
    product = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
    if transposed:
        return jnp.swapaxes(product, -1, -2).reshape(kernel_shape)
    return product.reshape(kernel_shape)


def fused_delta(lora_a: jax.Array, lora_b: jax.Array, kernel_shape: tuple[int, ...],
                mask: tuple[bool, ...], *, transposed: bool = False, where: str = "") -> jax.Array:
    """``delta`` of a fused projection: slice ``i`` of the output gets ``A_i @ B_i`` if ``mask[i]``.

    ``lora_a: (*stack, n_enabled, fan_in, r)``, ``lora_b: (*stack, n_enabled, r, fan_out/len(mask))``.
    """
    n_stack = len(kernel_shape) - 2
    fan_out = kernel_shape[-2] if transposed else kernel_shape[-1]
    per_slice = (*kernel_shape[:n_stack], sum(mask), kernel_shape[-1] if transposed else kernel_shape[-2],
                 fan_out // len(mask))
    products = delta(lora_a, lora_b, per_slice, where=where)  # (*stack, n_enabled, fan_in, slice)
    zeros = jnp.zeros(per_slice[:n_stack] + per_slice[-2:], jnp.float32)
    slots = iter(range(sum(mask)))
    full = jnp.concatenate([products[..., next(slots), :, :] if on else zeros for on in mask], axis=-1)
    return jnp.swapaxes(full, -1, -2) if transposed else full


def _fold(params: Tree, lora: Tree, config: LoraConfig, sign: float) -> dict[str, Any]:
    in_vars = is_variables_dict(params)
    flat = flatten(params)
    for mod, pair in adapter_modules(lora).items():
        where = key_path_str(mod)
        kernel_path = next((p for p in ((*mod, k) for k in KERNEL_KEYS) if p in flat), None)
        if kernel_path is None:
            raise ValueError(f"lora: no kernel or embedding at {where!r} in params; the adapter tree does "
                             "not belong to these params")
        mpath = module_path(kernel_path, in_vars)
        kernel = flat[kernel_path]
        transposed = config.fan_in_fan_out and kernel_path[-1] == "kernel"
        mask = config.slices_for(mpath)
        if mask is None:
            update = delta(pair["lora_a"], pair["lora_b"], kernel.shape, transposed=transposed, where=mpath)
        else:
            update = fused_delta(pair["lora_a"], pair["lora_b"], kernel.shape, mask, transposed=transposed,
                                 where=mpath)
        scale = adapter_scale(config, mpath, pair["lora_a"])
        flat[kernel_path] = (kernel.astype(jnp.float32) + sign * scale * update).astype(kernel.dtype)
    return unflatten(flat)


def merge(params: Tree, lora: Tree, config: LoraConfig) -> dict[str, Any]:
    """Fold every adapter into its kernel: ``W <- W + scale * lora_a @ lora_b``.

    The sum is formed in float32 and cast back to the kernel's dtype. Leaves of ``lora`` other
    than ``lora_a``/``lora_b`` (trained biases, ``modules_to_save``, as made by :func:`jlora.split`)
    replace their counterparts in ``params``, so the result is the whole fine-tuned model.
    """
    merged = flatten(_fold(params, lora, config, +1.0))
    for path, leaf in flatten(lora, "lora").items():
        if path[-1] not in LORA_KEYS:
            merged[path] = leaf
    return unflatten(merged)


def unmerge(merged: Tree, lora: Tree, config: LoraConfig) -> dict[str, Any]:
    """Inverse of :func:`merge` for the kernels: ``W <- W - scale * lora_a @ lora_b``.

    Exact up to float rounding of the kernel's dtype. Trained biases and ``modules_to_save``
    stay as they are in ``merged`` (there is no frozen copy to return to).
    """
    return _fold(merged, lora, config, -1.0)
