"""Train-step factories: ``jax.jit`` with shardings and donation, and a ``pmap`` data-parallel variant.

Both take ``loss_fn(trainable, frozen, batch) -> scalar`` (e.g. built on ``jlora.apply``) and an
optax transformation (e.g. ``jlora.optimizer``), and return
``step(trainable, opt_state, frozen, batch) -> (trainable, opt_state, loss)`` with gradients taken
w.r.t. ``trainable`` only.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jlora.config import LoraConfig
from jlora.sharding import derive_specs, named, opt_state_specs
from jlora.tree import Tree, flatten, unflatten

LossFn = Callable[[Tree, Tree, Any], jax.Array]
Step = Callable[[Tree, Any, Tree, Any], tuple[Tree, Any, jax.Array]]


def _update(loss_fn: LossFn, tx: optax.GradientTransformation) -> Step:
    def step(trainable: Tree, opt_state: Any, frozen: Tree, batch: Any) -> tuple[Tree, Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, batch)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss
    return step


@dataclasses.dataclass(frozen=True)
class Shardings:
    """NamedSharding trees (or prefixes) for each argument of a train step."""

    trainable: Any
    opt_state: Any
    frozen: Any
    batch: Any
    replicated: NamedSharding

    def place(self, trainable: Tree, opt_state: Any, frozen: Tree) -> tuple[Tree, Any, Tree]:
        """``jax.device_put`` the three states onto their shardings."""
        return (jax.device_put(trainable, self.trainable), jax.device_put(opt_state, self.opt_state),
                jax.device_put(frozen, self.frozen))


def plan_shardings(mesh: Mesh, params: Tree, param_specs: Tree, trainable: Tree, frozen: Tree,
                   tx: optax.GradientTransformation, config: LoraConfig, batch_spec: Any = P("data"), *,
                   model: Any = None) -> Shardings:
    """Shardings for a LoRA train step from the base params' PartitionSpecs alone.

    ``trainable`` follows :func:`jlora.sharding.derive_specs`, the optimizer state follows
    ``trainable``, ``frozen`` keeps the base specs, the batch uses ``batch_spec`` (a PartitionSpec
    for every batch leaf, or a tree of them).
    """
    trainable_specs = derive_specs(params, param_specs, trainable, config, mesh=mesh, model=model)
    specs = flatten(param_specs, "param_specs")
    frozen_specs = unflatten({path: specs.get(path, P()) for path in flatten(frozen, "frozen")})
    return Shardings(trainable=named(mesh, trainable_specs),
                     opt_state=named(mesh, opt_state_specs(tx, trainable, trainable_specs)),
                     frozen=named(mesh, frozen_specs), batch=named(mesh, batch_spec),
                     replicated=NamedSharding(mesh, P()))


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, shardings: Shardings | None = None, *,
                    donate: bool = True) -> Step:
    """A jitted train step; with ``shardings`` (from :func:`plan_shardings`) it is pinned to them.

    ``donate`` donates the trainable tree and optimizer state (updated in place on accelerators).
    """
    donate_argnums = (0, 1) if donate else ()
    step = _update(loss_fn, tx)
    if shardings is None:
        return jax.jit(step, donate_argnums=donate_argnums)
    s = shardings
    return jax.jit(step, in_shardings=(s.trainable, s.opt_state, s.frozen, s.batch),
                   out_shardings=(s.trainable, s.opt_state, s.replicated), donate_argnums=donate_argnums)


def make_pmap_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, axis_name: str = "batch") -> Step:
    """Data-parallel step over local devices with ``jax.pmap``: the batch has a leading device axis,
    the states are passed once (broadcast) and come back as one copy; gradients and loss are
    averaged across devices with ``lax.pmean``."""
    def step(trainable: Tree, opt_state: Any, frozen: Tree, batch: Any) -> tuple[Tree, Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, batch)
        grads, loss = jax.lax.pmean((grads, loss), axis_name)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    mapped = jax.pmap(step, axis_name=axis_name, in_axes=(None, None, None, 0), out_axes=None)
    return mapped
