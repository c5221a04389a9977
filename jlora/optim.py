"""Training wiring: which leaves train, optax masks, and the split into trainable/frozen trees.

A leaf trains when it is an adapter factor (``lora_a``/``lora_b``), lies in one of
``config.modules_to_save``, or is a ``bias`` that ``config.bias`` releases (``"all"``: every bias,
``"lora_only"``: biases of targeted modules). Everything else is frozen.

The recommended loop takes gradients w.r.t. the trainable tree only::

    trainable, frozen = jlora.split(params, lora, config)
    tx = jlora.optimizer(optax.adamw(1e-3), config)
    opt_state = tx.init(trainable)
    grads = jax.grad(lambda t: loss(f(frozen, t, batch)))(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)

``optimizer`` also accepts the whole combined tree (``jlora.combine(params, lora)``): frozen leaves
get ``optax.set_to_zero()``, which keeps no state for them and leaves them bit-identical.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jlora.config import LoraConfig, check_config
from jlora.plan import make_plan
from jlora.tree import (LORA_KEYS, KeyPath, Tree, combine, flatten, is_variables_dict, module_path,
                        unflatten)

TRAINABLE, FROZEN = "trainable", "frozen"


def _is_trainable(path: KeyPath, in_vars: bool, config: LoraConfig) -> bool:
    if in_vars and path[0] != "params":
        return False
    mpath = module_path(path, in_vars)
    if path[-1] in LORA_KEYS or config.is_saved_module(mpath):
        return True
    if path[-1] == "bias":
        return config.bias == "all" or (config.bias == "lora_only" and config.is_target(mpath))
    return False


def labels(tree: Tree, config: LoraConfig) -> dict[str, Any]:
    """``"trainable"``/``"frozen"`` for every leaf of ``tree`` (params, lora or their combination)."""
    check_config(config, "jlora.labels")
    in_vars = is_variables_dict(tree)
    return unflatten({path: TRAINABLE if _is_trainable(path, in_vars, config) else FROZEN
                      for path in flatten(tree)})


def optimizer(tx: optax.GradientTransformation, config: LoraConfig) -> optax.GradientTransformation:
    """``optax.multi_transform``: ``tx`` on trainable leaves, ``optax.set_to_zero()`` on frozen ones."""
    check_config(config, "jlora.optimizer")
    return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()},
                                 lambda tree: labels(tree, config))


def split(params: Tree, lora: Tree, config: LoraConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Partition ``params`` + ``lora`` into ``(trainable, frozen)``.

    ``trainable`` holds the adapters plus copies of the base leaves the config trains (biases,
    ``modules_to_save``; copied so that donating ``trainable`` to a train step leaves ``params``
    usable); ``frozen`` holds the rest of ``params``. ``combine(frozen, trainable)``
    rebuilds the whole tree, and ``jlora.apply(fn, config)(frozen, trainable, ...)`` runs the model.
    """
    check_config(config, "jlora.split")
    if any(path[-1] in LORA_KEYS for path in flatten(lora, "lora")):
        make_plan(params, config, lora=lora, caller="jlora.split")  # each adapter checked against its kernel
    in_vars = is_variables_dict(params)
    trainable, frozen = {}, {}
    for path, leaf in flatten(combine(params, lora)).items():
        if not _is_trainable(path, in_vars, config):
            frozen[path] = leaf
        elif path[-1] in LORA_KEYS or not isinstance(leaf, (jax.Array, np.ndarray)):
            trainable[path] = leaf
        else:  # a copy: a train step that donates `trainable` must not delete the caller's params
            trainable[path] = jnp.array(leaf, copy=True)
    return unflatten(trainable), unflatten(frozen)
