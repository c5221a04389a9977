"""``jlora.apply``: LoRA for any linen model without touching its code.

``apply(fn, config)`` returns ``f(params, lora, *args, **kwargs)``, which overlays ``lora`` onto
``params`` (each adapter lands in its layer's own params dict, next to the kernel) and calls
``fn(combined, *args, **kwargs)`` under ``flax.linen.intercept_methods``. When an ``nn.Dense``,
``nn.DenseGeneral`` or ``nn.Embed`` whose params hold ``lora_a``/``lora_b`` is called, the
interceptor runs the layer unchanged and adds the low-rank path of :mod:`jlora.layers`.

Because the adapters live in the params collection, every linen lifted transform treats them
like the kernel: ``nn.scan``/``nn.vmap`` slice a stacked ``(layers, fan_in, r)`` adapter per layer,
``nn.remat`` rematerialises them, and ``jax.jit``/``pmap``/``grad``/``checkpoint`` see plain
arrays. An adapter that no intercepted call used is an error (it would silently train nothing).
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from jlora.config import LoraConfig
from jlora.core import KernelLayout, adapter_scale
from jlora.layers import add_delta, attend_delta, dense_delta, dropout, embed_delta, fused_dense_delta
from jlora.tree import (COLLECTION, Tree, adapter_modules, combine, flatten, is_variables_dict,
                        key_path_str)

SUPPORTED = (nn.Dense, nn.DenseGeneral, nn.Embed)
TRANSPOSED_LAYERS = ("FlaxConv1D",)  # HF GPT-2's projection: kernel stored (fan_out, fan_in)


def is_transposed_layer(module: nn.Module) -> bool:
    """Layers whose kernel is stored (fan_out, fan_in), e.g. GPT-2's ``FlaxConv1D``."""
    return type(module).__name__ in TRANSPOSED_LAYERS


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, SUPPORTED) or is_transposed_layer(module)


def _first_input(args: tuple, kwargs: dict) -> Any:
    if args:
        return args[0]
    if kwargs:
        return next(iter(kwargs.values()))
    raise TypeError("LoRA layer called without inputs")


def _contracted_axes(module: nn.Module) -> tuple[int, ...]:
    if isinstance(module, nn.DenseGeneral):
        if tuple(nn.linear._canonicalize_tuple(module.batch_dims)):
            raise NotImplementedError(f"jlora: DenseGeneral at {'/'.join(module.path)!r} has batch_dims="
                                      f"{module.batch_dims}; LoRA on batched kernels is not supported")
        return nn.linear._canonicalize_tuple(module.axis)
    return (-1,)


def is_hf_model(obj: Any) -> bool:
    """A Hugging Face ``FlaxPreTrainedModel`` (checked only if transformers is already imported;
    transformers 5 has no Flax models, so nothing is one there)."""
    transformers = sys.modules.get("transformers")
    flax_model_class = getattr(transformers, "FlaxPreTrainedModel", None) if transformers is not None else None
    return flax_model_class is not None and isinstance(obj, flax_model_class)


def as_params_function(fn: Any) -> Callable:
    """``fn`` itself, or for an HF Flax model ``(params, *a, **kw) -> model(*a, params=params, **kw)``."""
    if is_hf_model(fn):
        def call_model(params: Tree, *args: Any, **kwargs: Any) -> Any:
            return fn(*args, params=params, **kwargs)
        return call_model
    if not callable(fn):
        raise TypeError(f"jlora.apply: fn must be callable (e.g. module.apply) or an HF Flax model, "
                        f"got {type(fn).__name__}")
    return fn


class _Interceptor:
    """Adds the LoRA path to adapted layers; records which adapters were used."""

    def __init__(self, config: LoraConfig, dropout_rng: str):
        self.config = config
        self.dropout_rng = dropout_rng
        self.used: set[str] = set()

    def __call__(self, next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        module = context.module
        wrapped = context.method_name == "__call__" or (context.method_name == "attend" and isinstance(module, nn.Embed))
        if not wrapped or not is_adaptable(module) or not module.has_variable(COLLECTION, "lora_a"):
            return next_fun(*args, **kwargs)
        path = "/".join(module.path)
        lora_a = module.get_variable(COLLECTION, "lora_a")
        lora_b = module.get_variable(COLLECTION, "lora_b")
        if lora_b is None:
            raise ValueError(f"lora: module {path!r} has lora_a but no lora_b")
        scale = adapter_scale(self.config, path, lora_a)
        if not isinstance(module, nn.Embed) and is_transposed_layer(module) != self.config.fan_in_fan_out:
            raise ValueError(
                f"LoraConfig.fan_in_fan_out={self.config.fan_in_fan_out} but the layer at {path!r} "
                f"({type(module).__name__}) stores its kernel as "
                f"{'(fan_out, fan_in)' if is_transposed_layer(module) else '(fan_in, fan_out)'}: set "
                f"fan_in_fan_out={is_transposed_layer(module)} (one config cannot mix both kinds)")
        self.used.add(path)
        base = next_fun(*args, **kwargs)
        x = _first_input(args, kwargs)
        if isinstance(module, nn.Embed):
            if context.method_name == "attend":
                return add_delta(base, attend_delta(x, lora_a, lora_b, scale))
            return add_delta(base, embed_delta(x, lora_a, lora_b, scale))
        rng = None
        if self.config.lora_dropout > 0.0 and module.has_rng(self.dropout_rng):
            rng = module.make_rng(self.dropout_rng)
        x = dropout(x, self.config.lora_dropout, rng)
        mask = self.config.slices_for(path)
        if mask is not None:
            return add_delta(base, fused_dense_delta(x, lora_a, lora_b, scale, mask,
                                                     precision=module.precision))
        return add_delta(base, dense_delta(x, lora_a, lora_b, scale, axis=_contracted_axes(module),
                                           precision=module.precision))


class LoraApply:
    """``f(params, lora, *args, **kwargs)``: ``fn`` with every adapter in ``lora`` applied.

    Args (of the call):
      params: what ``fn`` takes first (a linen variables dict for ``module.apply``; an HF Flax
        model's params dict, when ``fn`` is the model: its inputs, ``dropout_rng`` and ``train``
        pass through as keyword/positional args).
      lora: the adapter tree of :func:`jlora.init`, or the trainable tree of :func:`jlora.split`
        (its trained biases / ``modules_to_save`` replace the frozen ones).
      *args, **kwargs: passed through to ``fn``. LoRA dropout is active when ``fn`` is given an
        rng for the ``dropout_rng`` stream (``rngs={"dropout": key}``), as for ``nn.Dropout``.
    """

    def __init__(self, fn: Callable, config: LoraConfig, *, dropout_rng: str = "dropout",
                 allow_unused: bool = False):
        if not isinstance(config, LoraConfig):
            raise TypeError(f"jlora.apply: config must be a jlora.LoraConfig, got {type(config).__name__}")
        self.fn, self.config = as_params_function(fn), config
        self.dropout_rng, self.allow_unused = dropout_rng, allow_unused

    def __call__(self, params: Tree, lora: Tree, *args: Any, **kwargs: Any) -> Any:
        interceptor = _Interceptor(self.config, self.dropout_rng)
        with nn.intercept_methods(interceptor):
            out = self.fn(combine(params, lora), *args, **kwargs)
        if not self.allow_unused:
            self._check_used(params, lora, interceptor.used)
        return out

    @staticmethod
    def _check_used(params: Tree, lora: Tree, used: set[str]) -> None:
        skip = 1 if is_variables_dict(params) else 0
        unused = sorted(key_path_str(path[skip:]) for path in adapter_modules(lora)
                        if key_path_str(path[skip:]) not in used)
        if unused:
            raise ValueError(
                f"jlora.apply: the adapters at {unused} were never used: no nn.Dense, nn.DenseGeneral or "
                "nn.Embed call with those paths ran inside fn (another layer kind, or a layer not called "
                "in this forward). Pass allow_unused=True to jlora.apply if that is intended.")


def apply(fn: Callable, config: LoraConfig, *, dropout_rng: str = "dropout",
          allow_unused: bool = False) -> LoraApply:
    """Wrap ``fn`` (e.g. ``module.apply``) as ``f(params, lora, *args, **kwargs)``.

    ``f(params, lora, *a) == fn(params, *a)`` with each targeted kernel ``W`` acting as
    ``W + scale * lora_a @ lora_b``, computed as ``x @ W + scale * (x @ lora_a) @ lora_b``.
    """
    return LoraApply(fn, config, dropout_rng=dropout_rng, allow_unused=allow_unused)


def find_layouts(fn: Callable, params: Tree, *args: Any, **kwargs: Any) -> dict[str, KernelLayout]:
    """Read every Dense/DenseGeneral/Embed kernel's :class:`KernelLayout` off a model.

    Runs ``fn(params, *args, **kwargs)`` abstractly (``jax.eval_shape``: no FLOPs) and, for each
    layer call, compares the kernel the layer sees with the one in ``params``: extra leading axes
    are stacked layers (``nn.scan``), the layer's ``axis`` gives the input axes.
    """
    fn = as_params_function(fn)
    flat = flatten(params)
    prefix = (COLLECTION,) if is_variables_dict(params) else ()
    layouts: dict[str, KernelLayout] = {}

    def record(next_fun: Callable, a: tuple, kw: dict, context: Any) -> Any:
        module = context.module
        if context.method_name == "__call__" and is_adaptable(module):
            leaf = "embedding" if isinstance(module, nn.Embed) else "kernel"
            seen = module.get_variable(COLLECTION, leaf)
            stored = flat.get((*prefix, *module.path, leaf))
            if seen is not None and stored is not None:
                layouts["/".join(module.path)] = KernelLayout(
                    stack_dims=stored.ndim - seen.ndim, in_dims=len(_contracted_axes(module)),
                    transposed=is_transposed_layer(module))
        return next_fun(*a, **kw)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda p: fn(p, *args, **kwargs), params)
    return layouts
