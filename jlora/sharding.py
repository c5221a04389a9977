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

from typing import Any

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jlora.config import LoraConfig
from jlora.plan import fits, make_plan, spec_entries
from jlora.qformats import is_quantized
from jlora.tree import LORA_KEYS, Tree, flatten, unflatten


def derive_specs(params: Tree, param_specs: Tree, trainable: Tree, config: LoraConfig, *,
                 mesh: Mesh | None = None, model: Any = None) -> dict[str, Any]:
    """PartitionSpecs for ``trainable`` (adapters + trained base leaves) from the base's specs.

    Args:
      params: the base params (arrays or ``jax.ShapeDtypeStruct``s: only shapes are read).
      param_specs: a tree mirroring ``params`` with ``PartitionSpec`` (or ``NamedSharding``) leaves;
        a missing leaf means replicated.
      trainable: the adapter tree or the trainable tree of :func:`jlora.split`.
      mesh: when given, axes the mesh does not divide are replicated.
      model: optional, settles a square 2-D kernel's storage order (see :func:`jlora.make_plan`).
    """
    specs = flatten(param_specs, "param_specs")
    flat = flatten(trainable, "lora")
    has_adapters = any(path[-1] in LORA_KEYS for path in flat)
    plan = make_plan(params, config, lora=trainable, model=model, caller="jlora.plan_shardings") \
        if has_adapters else {}
    out: dict[tuple, Any] = {}
    for path, leaf in flat.items():
        if path[-1] not in LORA_KEYS:
            spec = specs.get(path)
            out[path] = P(*spec_entries(spec, len(leaf.shape)))
    for target in plan.values():
        a_spec, b_spec = target.specs(specs.get(target.key_path), mesh)
        module = target.key_path[:-1]
        out[(*module, "lora_a")], out[(*module, "lora_b")] = a_spec, b_spec
    return unflatten(out)


def leaf_specs(leaf: Any, spec: Any, mesh: Mesh | None = None) -> Any:
    """``spec`` for a params leaf; for a quantized kernel (:mod:`jlora.qformats`), a tree of specs, one
    per array of it: the kernel's entry on each axis (its arrays keep the kernel's axes), replicated
    where the array's length there (e.g. a block axis of scales) does not divide over the mesh axes."""
    if not is_quantized(leaf):
        return spec
    entries = spec_entries(spec, leaf.ndim)
    return jax.tree_util.tree_map(lambda a: P(*(fits(e, n, mesh) for e, n in zip(entries, a.shape))), leaf)


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
