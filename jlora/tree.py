"""Path utilities for nested-dict parameter trees (linen variables, HF Flax params).

A *key path* is the tuple of dict keys from the root to a leaf, e.g.
``("params", "encoder", "layer", "0", "attention", "self", "query", "kernel")``.
A *module path* is the "/"-joined key path of the dict that holds a kernel, with a leading
``params`` collection left out: ``"encoder/layer/0/attention/self/query"``. Module paths are what
``LoraConfig`` matches, and they equal ``flax.linen.Module.path`` of the layer that owns the kernel.

``combine`` overlays an adapter (or any trainable) tree onto params; ``partition`` is its inverse
for trees whose modules hold ``lora_a``/``lora_b`` next to their kernels.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import traverse_util

LORA_KEYS = ("lora_a", "lora_b")
KERNEL_KEYS = ("kernel", "embedding")
COLLECTION = "params"
KeyPath = tuple[str, ...]
Tree = Mapping[str, Any]


def flatten(tree: Tree, name: str = "params") -> dict[KeyPath, Any]:
    """``{key_path: leaf}`` of a nested mapping; raises naming ``name`` if it is not one."""
    if not isinstance(tree, Mapping):
        raise TypeError(f"{name}: expected a nested dict of arrays (e.g. a linen variables dict or "
                        f"an HF Flax model's params), got {type(tree).__name__}")
    return traverse_util.flatten_dict(tree, keep_empty_nodes=False)


def unflatten(flat: Mapping[KeyPath, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten`, always plain dicts."""
    return traverse_util.unflatten_dict(dict(flat))


def is_variables_dict(tree: Tree) -> bool:
    """A linen variables dict (``{"params": {...}, ...}``) rather than a bare params dict."""
    return isinstance(tree, Mapping) and isinstance(tree.get(COLLECTION), Mapping)


def module_path(key_path: KeyPath, in_variables: bool) -> str:
    """The "/"-joined module path of the dict holding the leaf at ``key_path``."""
    keys = key_path[1:-1] if in_variables else key_path[:-1]
    return "/".join(str(k) for k in keys)


def key_path_str(key_path: KeyPath) -> str:
    return "/".join(str(k) for k in key_path)


def kernel_paths(params: Tree) -> dict[KeyPath, Any]:
    """Every ``kernel``/``embedding`` leaf of at least two dims, by key path (in the params collection)."""
    flat = flatten(params)
    in_vars = is_variables_dict(params)
    return {path: leaf for path, leaf in flat.items()
            if path[-1] in KERNEL_KEYS and getattr(leaf, "ndim", 0) >= 2
            and (not in_vars or path[0] == COLLECTION)}


def combine(params: Tree, overlay: Tree) -> dict[str, Any]:
    """Deep merge: ``params`` with every leaf of ``overlay`` added or, where both have it, replaced.

    Used to hand a LoRA tree (``lora_a``/``lora_b`` added next to their kernels) and trained
    biases or ``modules_to_save`` (replacing the frozen ones) to the model in one params tree.
    Paths that are not in ``params`` are added as they are: the consumers (:func:`jlora.apply`,
    :func:`jlora.merge`) say which adapter found no layer.
    """
    flat = flatten(params)
    flat.update(flatten(overlay, "lora"))
    return unflatten(flat)


def partition(tree: Tree) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``lora_a``/``lora_b`` leaves out of a combined tree: ``(params, lora)``.

    ``combine(*partition(t)) == t`` for any tree, e.g. the variables of a model built with
    :class:`jlora.LoraDense` layers.
    """
    base, lora = {}, {}
    for path, leaf in flatten(tree).items():
        (lora if path[-1] in LORA_KEYS else base)[path] = leaf
    return unflatten(base), unflatten(lora)


def adapter_modules(lora: Tree) -> dict[KeyPath, dict[str, Any]]:
    """``{module key path: {"lora_a": a, "lora_b": b}}`` for every adapter in ``lora``."""
    modules: dict[KeyPath, dict[str, Any]] = {}
    for path, leaf in flatten(lora, "lora").items():
        if path[-1] in LORA_KEYS:
            modules.setdefault(path[:-1], {})[path[-1]] = leaf
    for path, pair in modules.items():
        missing = [k for k in LORA_KEYS if k not in pair]
        if missing:
            raise ValueError(f"lora: module {key_path_str(path)!r} lacks {missing}; every adapter needs "
                             "both lora_a (fan_in, r) and lora_b (r, fan_out)")
    return modules
