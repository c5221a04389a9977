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
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jlora.config import LoraConfig
from jlora.sharding import derive_specs, leaf_specs, named, opt_state_specs
from jlora.tree import Tree, flatten, unflatten

LossFn = Callable[[Tree, Tree, Any], jax.Array]
Step = Callable[[Tree, Any, Tree, Any], tuple[Tree, Any, jax.Array]]


def _update(loss_fn: LossFn, tx: optax.GradientTransformation, accumulate: int = 1,
            weight_fn: Callable[[Any], jax.Array] | None = None) -> Step:
    def step(trainable: Tree, opt_state: Any, frozen: Tree, batch: Any) -> tuple[Tree, Any, jax.Array]:
        if accumulate == 1:
            loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, batch)
        else:
            loss, grads = _accumulated(loss_fn, trainable, frozen, batch, accumulate, weight_fn)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss
    return step


def _accumulated(loss_fn: LossFn, trainable: Tree, frozen: Tree, batch: Any, k: int,
                 weight_fn: Callable[[Any], jax.Array] | None) -> tuple[jax.Array, Tree]:
    """Loss and gradient of ``batch`` as ``k`` micro-batches in a ``lax.scan`` (one micro-batch's
    activations live at a time): ``L = sum_i s_i L_i``, ``g = sum_i s_i g_i`` with shares
    ``s_i = w_i / sum_j w_j`` (``w_i = weight_fn(micro_batch_i)``, default 1). When ``L_i`` is a
    weighted mean over micro-batch ``i`` with total weight ``w_i``, this equals the whole batch's."""
    def split(path: Any, x: Any) -> Any:
        if not hasattr(x, "shape") or not x.shape or x.shape[0] % k:
            raise ValueError(f"accumulate={k}: batch leaf {jax.tree_util.keystr(path)} with shape "
                             f"{getattr(x, 'shape', None)} does not split into {k} micro-batches on its first axis")
        return x.reshape(k, x.shape[0] // k, *x.shape[1:])

    micro = jax.tree_util.tree_map_with_path(split, batch)
    weights = jax.vmap(weight_fn)(micro) if weight_fn is not None else jnp.ones((k,), jnp.float32)
    shares = weights / jnp.maximum(weights.sum(), 1e-30)

    def body(carry: tuple, xs: tuple) -> tuple:
        loss_sum, grad_sum = carry
        one, share = xs
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, one)
        grad_sum = jax.tree_util.tree_map(lambda a, g: a + share * g.astype(a.dtype), grad_sum, grads)
        return (loss_sum + share * loss, grad_sum), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, trainable)
    (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), (micro, shares))
    return loss, grads


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
    ``trainable``, ``frozen`` keeps the base specs (a quantized kernel's codes and scales each get its
    kernel's spec, an axis they do not divide replicated), the batch uses ``batch_spec`` (a PartitionSpec
    for every batch leaf, or a tree of them).
    """
    trainable_specs = derive_specs(params, param_specs, trainable, config, mesh=mesh, model=model)
    specs = flatten(param_specs, "param_specs")
    frozen_specs = unflatten({path: leaf_specs(leaf, specs.get(path, P()), mesh)
                              for path, leaf in flatten(frozen, "frozen").items()})
    return Shardings(trainable=named(mesh, trainable_specs),
                     opt_state=named(mesh, opt_state_specs(tx, trainable, trainable_specs)),
                     frozen=named(mesh, frozen_specs), batch=named(mesh, batch_spec),
                     replicated=NamedSharding(mesh, P()))


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, shardings: Shardings | None = None, *,
                    donate: bool = True, accumulate: int = 1,
                    weight_fn: Callable[[Any], jax.Array] | None = None) -> Step:
    """A jitted train step; with ``shardings`` (from :func:`plan_shardings`) it is pinned to them.

    ``donate`` donates the trainable tree and optimizer state (updated in place on accelerators).
    ``accumulate=k`` splits every batch leaf's first axis into ``k`` micro-batches whose gradients
    are summed in a ``lax.scan`` (the activation memory of one micro-batch), weighted by
    ``weight_fn(micro_batch)`` (e.g. its count of target tokens: then the step equals one over the
    whole batch, up to float rounding) or equally when ``weight_fn`` is None.
    """
    if not isinstance(accumulate, int) or accumulate < 1:
        raise ValueError(f"accumulate: expected a positive int, got {accumulate!r}")
    donate_argnums = (0, 1) if donate else ()
    step = _update(loss_fn, tx, accumulate, weight_fn)
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
