"""Shardings for adapters derived from the base params' shardings (the user declares nothing twice).

For a kernel ``W`` sharded as ``P(*stack, *in, *out)`` (one mesh-axis entry per kernel axis):

* ``lora_a (*stack, *in, r)`` gets ``P(*stack, *in, None)``: it shares W's input-axis sharding,
  so ``x @ lora_a`` contracts over the same sharded axis as ``x @ W``;
* ``lora_b (*stack, r, *out)`` gets ``P(*stack, None, *out)``: it shares W's output-axis sharding,
  so the low-rank output lands sharded like ``x @ W``;
* the rank axis is replicated (it is tiny). A transposed kernel (GPT-2's Conv1D, ``(out, in)``)
  and fused slices (``enable_lora``) are read accordingly; an axis whose length the mesh axes do
  not divide (e.g. a fused slice) is replicated instead.

Trained base leaves (biases, ``modules_to_save``) keep the base sharding. Optimizer state follows
the trainable tree through ``optax.tree_map_params``; its scalars are replicated.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jlora.config import LoraConfig
from jlora.tree import KERNEL_KEYS, LORA_KEYS, Tree, flatten, is_variables_dict, key_path_str, module_path, unflatten


def _entries(spec: Any, ndim: int) -> list[Any]:
    spec = spec.spec if isinstance(spec, NamedSharding) else spec
    if spec is None:
        return [None] * ndim
    entries = list(spec)
    if len(entries) > ndim:
        raise ValueError(f"PartitionSpec {spec} has more entries than the {ndim} axes of its array")
    return entries + [None] * (ndim - len(entries))


def _fits(entry: Any, length: int, mesh: Mesh | None) -> Any:
    """``entry`` if the mesh axes it names divide ``length``, else None (replicated)."""
    if entry is None or mesh is None:
        return entry
    names = entry if isinstance(entry, tuple) else (entry,)
    return entry if length % math.prod(mesh.shape[n] for n in names) == 0 else None


def adapter_specs(kernel_shape: tuple[int, ...], kernel_spec: Any, lora_a_shape: tuple[int, ...],
                  lora_b_shape: tuple[int, ...], *, transposed: bool = False, fused: bool = False,
                  mesh: Mesh | None = None) -> tuple[P, P]:
    """``(spec of lora_a, spec of lora_b)`` from the kernel's spec; see the module docstring."""
    k = _entries(kernel_spec, len(kernel_shape))
    extra = 1 if fused else 0  # fused adapters carry a leading (n_enabled,) slice axis after the stack
    n_stack = len(lora_a_shape) + len(lora_b_shape) - 2 - 2 * extra - len(kernel_shape)
    n_in = len(lora_a_shape) - 1 - n_stack - extra
    stack = k[:n_stack]
    if transposed:
        k_in, k_out = k[n_stack + 1:n_stack + 2], k[n_stack:n_stack + 1]
    else:
        k_in, k_out = k[n_stack:n_stack + n_in], k[n_stack + n_in:]
    a = [*stack, *([None] * extra), *k_in, None]
    b = [*stack, *([None] * extra), None, *k_out]
    a = [_fits(e, n, mesh) for e, n in zip(a, lora_a_shape)]
    b = [_fits(e, n, mesh) for e, n in zip(b, lora_b_shape)]
    return P(*a), P(*b)


def derive_specs(params: Tree, param_specs: Tree, trainable: Tree, config: LoraConfig, *,
                 mesh: Mesh | None = None) -> dict[str, Any]:
    """PartitionSpecs for ``trainable`` (adapters + trained base leaves) from the base's specs.

    Args:
      params: the base params (arrays or ``jax.ShapeDtypeStruct``s: only shapes are read).
      param_specs: a tree mirroring ``params`` with ``PartitionSpec`` (or ``NamedSharding``) leaves;
        a missing leaf means replicated.
      trainable: the adapter tree or the trainable tree of :func:`jlora.split`.
      mesh: when given, axes the mesh does not divide are replicated.
    """
    shapes, specs = flatten(params), flatten(param_specs, "param_specs")
    in_vars = is_variables_dict(params)
    out: dict[tuple, Any] = {}
    flat = flatten(trainable, "lora")
    for path, leaf in flat.items():
        if path[-1] not in LORA_KEYS:
            out[path] = P(*_entries(specs.get(path), len(leaf.shape)))
            continue
        if path[-1] == "lora_b":
            continue
        module = path[:-1]
        kernel_path = next((p for p in ((*module, k) for k in KERNEL_KEYS) if p in shapes), None)
        if kernel_path is None:
            raise ValueError(f"lora: no kernel at {key_path_str(module)!r} in params")
        mpath = module_path(kernel_path, in_vars)
        a_spec, b_spec = adapter_specs(
            tuple(shapes[kernel_path].shape), specs.get(kernel_path), tuple(leaf.shape),
            tuple(flat[(*module, "lora_b")].shape),
            transposed=config.fan_in_fan_out and kernel_path[-1] == "kernel",
            fused=config.slices_for(mpath) is not None, mesh=mesh)
        out[path], out[(*module, "lora_b")] = a_spec, b_spec
    return unflatten(out)


def named(mesh: Mesh, specs: Tree) -> Any:
    """``NamedSharding(mesh, spec)`` for every PartitionSpec leaf of ``specs``."""
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def opt_state_specs(tx: optax.GradientTransformation, trainable: Tree, trainable_specs: Tree) -> Any:
    """Specs of ``tx.init(trainable)``: parameter-shaped state (Adam's moments, ...) follows
    ``trainable_specs``, the rest (step counts, scalars) is replicated.

    A state leaf is matched to the parameter whose key path ends its own path (``mu`` of
    ``params/fc1/lora_a`` sits at ``.../mu['params']['fc1']['lora_a']``) with the same shape.
    (``optax.tree_map_params`` cannot be used: it calls ``init`` on a placeholder, which
    ``multi_transform``'s label function cannot label.)
    """
    state = jax.eval_shape(tx.init, trainable)
    specs, shapes = flatten(trainable_specs, "trainable_specs"), flatten(trainable, "trainable")

    def spec_of(path: tuple, leaf: Any) -> P:
        keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        for start in range(len(keys)):
            tail = keys[start:]
            if tail in specs and tuple(shapes[tail].shape) == tuple(leaf.shape):
                return specs[tail]
        return P()

    return jax.tree_util.tree_map_with_path(spec_of, state)
