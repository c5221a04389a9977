"""Layers over quantized kernels: dequantize one layer at a time, inside the jitted computation.

:func:`quantized_layers` is a ``flax.linen`` method interceptor: when an ``nn.Dense``,
``nn.DenseGeneral``, a registered transposed layer (GPT-2's Conv1D) or an ``nn.Embed`` whose
kernel / table is a quantized leaf (:mod:`jlora.qformats`) is called, it runs the layer's own code
on ``W = q.dequantize()`` (so dtype promotion, precision and the layer's contraction stay the
layer's), through a ``jax.custom_vjp`` whose backward pass **dequantizes again** instead of keeping
``W`` from the forward pass:

    forward:  y = layer(x; W = dequant(q), b)          residuals: q, b (what the model holds anyway)
    backward: W = dequant(q) again; (dx, db) = vjp of layer(·; W, ·) at (0, b) applied to dy

Dense-like layers are affine in ``(x, b)``, so their vjp does not depend on ``x`` and ``x`` is not
kept either. Only about one layer's full-precision kernel is live at a time, in the forward and
in the backward: each dequantization is made to depend on the layer's input (forward) or its
output gradient (backward), which keeps XLA from hoisting them all to the start of the step or
merging the two into one long-lived ``W``. The quantized base gets no gradient (zero
cotangents): it is frozen by construction. ``jlora.apply`` and ``jlora.generate`` install the
interceptor themselves; call a model yourself over a quantized base under
``with jlora.quantized_layers():``.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jlora.layerkinds import is_transposed_layer
from jlora.qformats import is_quantized
from jlora.tree import COLLECTION, LORA_KEYS


_STATE = threading.local()


def inside_dequantized_call() -> bool:
    """Whether a layer is being computed over its dequantized kernel right now: the layer's own code
    runs then as a top-level module (path ``()``), which other interceptors must let through (jlora's
    LoRA interceptor would otherwise take it for a kernel-less tied head)."""
    return getattr(_STATE, "depth", 0) > 0


@contextlib.contextmanager
def _computing_base() -> Iterator[None]:
    _STATE.depth = getattr(_STATE, "depth", 0) + 1
    try:
        yield
    finally:
        _STATE.depth -= 1


def _zero_cotangent(x: Any) -> Any:
    dtype = jnp.result_type(x)
    if jnp.issubdtype(dtype, jnp.inexact):
        return jnp.zeros(jnp.shape(x), dtype)
    return np.zeros(jnp.shape(x), jax.dtypes.float0)


def _first_input(args: tuple, kwargs: dict) -> tuple[Any, Callable[[Any], tuple[tuple, dict]]]:
    """The layer's input and a function that puts another value in its place."""
    if args:
        return args[0], lambda x: ((x, *args[1:]), kwargs)
    if len(kwargs) == 1:
        (name, value), = kwargs.items()
        return value, lambda x: ((), {name: x})
    raise TypeError(f"a layer over a quantized kernel was called with {len(args)} positional and {sorted(kwargs)} "
                    "keyword inputs; expected its one input array")


def _quantized_leaf(module: nn.Module, method: str) -> str | None:
    """The name of the quantized param this call computes with, if any."""
    if isinstance(module, nn.Embed):
        if method in ("__call__", "attend") and is_quantized(module.get_variable(COLLECTION, "embedding")):
            return "embedding"
        return None
    if method != "__call__" or not module.has_variable(COLLECTION, "kernel"):
        return None
    if not is_quantized(module.get_variable(COLLECTION, "kernel")):
        return None
    if isinstance(module, (nn.Dense, nn.DenseGeneral)) or is_transposed_layer(module):
        return "kernel"
    raise NotImplementedError(f"the {type(module).__name__} at {'/'.join(module.path)!r} holds a quantized kernel, "
                              "but jlora computes quantized kernels only in nn.Dense, nn.DenseGeneral, nn.Embed and "
                              "registered transposed layers (affine in their input); leave this kernel unquantized")


def _after(q_leaf: Any, anchor: Any) -> Any:
    """``q_leaf`` made to depend on ``anchor``'s first element, so that XLA cannot dequantize before
    ``anchor`` exists (a select that XLA fuses into the unpacking; the values are unchanged unless that
    element is NaN or inf, when the layer's output is NaN anyway). XLA:CPU drops
    ``optimization_barrier``s before scheduling and would otherwise dequantize every layer's kernel at
    the start of the step, all of them live at once."""
    anchor = jnp.asarray(jax.tree_util.tree_leaves(anchor)[0]).reshape(-1)
    # a reduction, which XLA computes once: a sliced element would be fused into the (kernel-sized)
    # unpacking with its whole producer chain (e.g. a dropout mask's threefry), at every element,
    # and the compile took minutes
    first = jnp.max(jnp.abs(anchor[:2].astype(jnp.float32)))
    bad = jnp.isnan(first * 0.0)  # False for any finite value

    def tie(leaf: jax.Array) -> jax.Array:  # every array: the codes' unpacking would be hoisted too
        return jnp.where(bad, jnp.zeros((), leaf.dtype), leaf)

    return jax.tree_util.tree_map(tie, q_leaf)


def call_dequantized(module: nn.Module, method: str, name: str, args: tuple, kwargs: dict) -> Any:
    """``module.<method>(*args, **kwargs)`` with its quantized param ``name`` dequantized, and the
    backward pass dequantizing again (see the module docstring)."""
    own = dict(module.variables[COLLECTION])
    q = own.pop(name)
    others = {k: v for k, v in own.items() if k not in LORA_KEYS}  # the bias (adapters are another interceptor's)
    clone = module.clone(parent=None)
    x, with_input = _first_input(args, kwargs)
    x_aval = jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))

    def run(x_value: Any, weight: jax.Array, rest: dict) -> Any:
        call_args, call_kwargs = with_input(x_value)
        with _computing_base():
            return clone.apply({COLLECTION: {**rest, name: weight}}, *call_args, method=method, **call_kwargs)

    @jax.custom_vjp
    def layer(x_value, q_leaf, rest):
        return run(x_value, _after(q_leaf, x_value).dequantize(), rest)

    def forward(x_value, q_leaf, rest):
        return layer(x_value, q_leaf, rest), (q_leaf, rest)

    def backward(residuals, dy):
        q_leaf, rest = residuals
        weight = _after(q_leaf, dy).dequantize()  # again, once dy exists (not the forward's W, kept)
        zero = jnp.zeros(x_aval.shape, x_aval.dtype)  # affine in (x, bias): the vjp is the same at any x
        _, pullback = jax.vjp(lambda xv, r: run(xv, weight, r), zero, rest)
        dx, drest = pullback(dy)
        return dx, jax.tree_util.tree_map(_zero_cotangent, q_leaf), drest

    layer.defvjp(forward, backward)
    try:
        return layer(x, q, others)
    except ValueError as err:  # the dequantization's dtype check: name the layer
        if "quantized" not in str(err):
            raise
        raise ValueError(f"the quantized {name} of {'/'.join(module.path)!r}: {err}") from None


def _interceptor(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
    name = _quantized_leaf(context.module, context.method_name)
    if name is None:
        return next_fun(*args, **kwargs)
    return call_dequantized(context.module, context.method_name, name, args, kwargs)


@contextlib.contextmanager
def quantized_layers() -> Iterator[None]:
    """Within this block, linen layers whose kernel is a quantized leaf compute over it (one layer's
    kernel dequantized at a time, forward and backward); other layers are untouched.

    It computes such a layer without calling the next interceptor, and flax calls the outermost
    interceptor first: enter it inside any other interceptor that must see the layer's call.
    """
    with nn.intercept_methods(_interceptor):
        yield
