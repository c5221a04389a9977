"""``jlora.apply``: LoRA for any linen model without touching its code.

``apply(fn, config)`` returns ``f(params, lora, *args, **kwargs)``, which builds the adapter plan
(:func:`jlora.plan.make_plan`: every adapter checked against its kernel and the config, naming the
module at fault), overlays ``lora`` onto ``params`` (each adapter lands in its layer's own params
dict, next to the kernel) and calls ``fn(combined, *args, **kwargs)`` under
``flax.linen.intercept_methods``. When an ``nn.Dense``, ``nn.DenseGeneral``, ``nn.Embed`` (or a
layer kind an integration registered, e.g. GPT-2's Conv1D) whose params hold ``lora_a``/``lora_b``
is called, the interceptor runs the layer unchanged and adds the low-rank path of
:mod:`jlora.layers`. A Dense-like head whose kernel is not a param of its own but an adapted
embedding table read transposed (a tied LM head) gets the embedding's adapter too: a tied weight
is one weight, so ``apply`` agrees with ``merge``.

Because the adapters live in the params collection, every linen lifted transform treats them
like the kernel: ``nn.scan``/``nn.vmap`` slice a stacked ``(layers, fan_in, r)`` adapter per layer,
``nn.remat`` rematerialises them, and ``jax.jit``/``pmap``/``grad``/``checkpoint`` see plain
arrays. An adapter that no intercepted call used is an error (it would silently train nothing).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax

from jlora.config import LoraConfig, check_config
from jlora.core import init
from jlora.layers import (LoraDense, add_delta, attend_delta, dense_delta, embed_delta, fused_dense_delta,
                          layer_dropout)
from jlora.layerkinds import (KernelLayout, as_function, checked_axes, discover, first_input, is_adaptable,
                               is_registered_model, observe_layers, tables_read_transposed)
from jlora.plan import AdapterPlan, Target, make_plan
from jlora.qlayers import inside_dequantized_call, quantized_layers
from jlora.tree import COLLECTION, Tree, adapter_modules, combine, flatten, kernel_paths, module_path


class _Interceptor:
    """Adds the LoRA path to adapted layers (and tied heads); records which adapters were used."""

    def __init__(self, plan: AdapterPlan, combined: Tree, lora: Tree, dropout_rng: str):
        self.plan, self.dropout_rng = plan, dropout_rng
        self.param_keys = set(flatten(combined))  # what the model is given: frozen and trained leaves
        self.prefix = (COLLECTION,) if plan.in_variables else ()
        pairs = adapter_modules(lora)
        self.embeddings = {t.path: (t, pairs[t.key_path[:-1]]) for t in plan.values() if t.kind == "embed"}
        self.tables = {module_path(p, plan.in_variables): tuple(leaf.shape)
                       for p, leaf in kernel_paths(combined).items() if p[-1] == "embedding"}
        self.used: set[str] = set()

    def _dropout(self, module: nn.Module, x: Any) -> Any:
        return layer_dropout(module, x, self.plan.config.lora_dropout, self.dropout_rng)

    def _tied_head(self, module: nn.Module) -> tuple[Target, Mapping[str, Any]] | None:
        """The adapted embedding whose table this kernel-less Dense call reads transposed, if any."""
        if not self.embeddings or not isinstance(module, nn.Dense) or \
                (*self.prefix, *module.path, "kernel") in self.param_keys:
            return None
        kernel = module.get_variable(COLLECTION, "kernel")
        if kernel is None:
            return None
        tables = tables_read_transposed(tuple(kernel.shape), self.tables)
        if len(tables) > 1 and set(tables) & set(self.embeddings):
            raise ValueError(f"jlora.apply: the head at {'/'.join(module.path)!r} reads a kernel of shape "
                             f"{tuple(kernel.shape)} that several embeddings could be tied to: {tables}, of which "
                             f"{sorted(set(tables) & set(self.embeddings))} carry adapters")
        return self.embeddings.get(tables[0]) if len(tables) == 1 else None

    def __call__(self, next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        if inside_dequantized_call():  # a layer's own code over its dequantized kernel: the base only
            return next_fun(*args, **kwargs)
        module = context.module
        method = context.method_name
        path = "/".join(module.path)
        if isinstance(module, LoraDense) and method == "__call__" and path in self.plan:
            if abs(module.scale - self.plan[path].scale) > 1e-12 * max(1.0, abs(module.scale)):
                raise ValueError(f"jlora.apply: LoraDense at {path!r} has scale {module.scale:g} (lora_alpha "
                                 f"{module.lora_alpha:g}, r {module.r}) but the config gives {self.plan[path].scale:g}; "
                                 "merge would fold a different update than the layer applies")
            self.used.add(path)
            return next_fun(*args, **kwargs)
        wrapped = method == "__call__" or (method == "attend" and isinstance(module, nn.Embed))
        if not wrapped or not is_adaptable(module):
            return next_fun(*args, **kwargs)
        if not module.has_variable(COLLECTION, "lora_a"):
            tied = self._tied_head(module) if method == "__call__" else None
            if tied is None:
                return next_fun(*args, **kwargs)
            target, pair = tied
            self.used.add(target.path)
            x = self._dropout(module, first_input(args, kwargs))
            return add_delta(next_fun(*args, **kwargs), attend_delta(x, pair["lora_a"], pair["lora_b"], target.scale))
        target = self.plan.get(path)
        if target is None:
            raise ValueError(f"jlora.apply: the layer at {path!r} holds lora_a but the adapter plan has no entry for "
                             "it; was lora made for another params tree?")
        lora_a = module.get_variable(COLLECTION, "lora_a")
        lora_b = module.get_variable(COLLECTION, "lora_b")
        self.used.add(path)
        base = next_fun(*args, **kwargs)
        x = first_input(args, kwargs)
        if isinstance(module, nn.Embed):
            if method == "attend":
                return add_delta(base, attend_delta(x, lora_a, lora_b, target.scale))
            return add_delta(base, embed_delta(x, lora_a, lora_b, target.scale))
        axes = checked_axes(module, x, lora_a, f"jlora.apply: the layer at {path!r} ({type(module).__name__}) "
                            "contracts inputs of shape {fan_in} but its lora_a is {shape}; the adapter was made with "
                            "the wrong axis roles (make it with jlora.init(..., model=...) so they are read off the layer)")
        x = self._dropout(module, x)
        precision = getattr(module, "precision", None)
        if target.slices is not None:
            return add_delta(base, fused_dense_delta(x, lora_a, lora_b, target.scale, target.slices,
                                                     precision=precision))
        return add_delta(base, dense_delta(x, lora_a, lora_b, target.scale, axis=axes, precision=precision))


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
        check_config(config, "jlora.apply")
        self.model, self.fn, self.config = fn, as_function(fn, "jlora.apply"), config
        self.dropout_rng, self.allow_unused = dropout_rng, allow_unused

    def plan(self, params: Tree, lora: Tree | None = None, *inputs: Any, **kwargs: Any) -> AdapterPlan:
        """The adapter plan over ``params``: of ``lora``'s adapters, or (``lora=None``) of the config's
        targets, with axis roles read off the model (``inputs``: example inputs of a linen model)."""
        return make_plan(params, self.config, lora=lora, model=self._model(inputs, kwargs), inputs=inputs,
                         caller="jlora.apply")

    def init(self, rng: jax.Array, params: Tree, *inputs: Any, dtype: Any = None,
             layouts: Mapping[str, KernelLayout] | None = None, **kwargs: Any) -> dict[str, Any]:
        """:func:`jlora.init` with the axis roles read off this model (``inputs``: example inputs of a
        linen model; an HF model needs none)."""
        return init(rng, params, self.config, model=self._model(inputs, kwargs), inputs=inputs, dtype=dtype,
                    layouts=layouts)

    def _model(self, inputs: tuple, kwargs: dict) -> Any:
        if self.model is not self.fn:  # a registered model object (HF): it makes its own dummy inputs
            return self.model
        return (lambda p, *a: self.fn(p, *a, **kwargs)) if inputs else None

    def __call__(self, params: Tree, lora: Tree, *args: Any, **kwargs: Any) -> Any:
        plan = make_plan(params, self.config, lora=lora, caller="jlora.apply")
        combined = combine(params, lora)
        interceptor = _Interceptor(plan, combined, lora, self.dropout_rng)
        with nn.intercept_methods(interceptor), quantized_layers():  # flax calls the outer one first: LoRA, then the base
            out = self.fn(combined, *args, **kwargs)
        if not self.allow_unused:
            unused = sorted(set(plan) - interceptor.used)
            if unused:
                raise ValueError(
                    f"jlora.apply: the adapters at {unused} were never used: no nn.Dense, nn.DenseGeneral, nn.Embed "
                    "(or registered layer) call with those paths ran inside fn (another layer kind, or a layer not "
                    "called in this forward). Pass allow_unused=True to jlora.apply if that is intended.")
        return out


def apply(fn: Callable, config: LoraConfig, *, dropout_rng: str = "dropout",
          allow_unused: bool = False) -> LoraApply:
    """Wrap ``fn`` (e.g. ``module.apply``, or an HF Flax model) as ``f(params, lora, *args, **kwargs)``.

    ``f(params, lora, *a) == fn(merge(params, lora, config), *a)``, computed as
    ``x @ W + scale * (x @ lora_a) @ lora_b`` for each adapted kernel ``W`` (never materialized).
    ``f.init(rng, params, *example_inputs)`` makes adapters with the axis roles read off ``fn``.
    """
    return LoraApply(fn, config, dropout_rng=dropout_rng, allow_unused=allow_unused)


def find_layouts(fn: Callable, params: Tree, *args: Any, **kwargs: Any) -> dict[str, KernelLayout]:
    """Every adaptable kernel's :class:`KernelLayout`, read off ``fn`` (``jax.eval_shape``, no FLOPs).

    Rarely needed: ``jlora.init(..., model=fn, inputs=...)`` and ``jlora.apply(fn, config).init``
    read the same facts themselves. An HF Flax model needs no ``args`` (it runs on dummy inputs).
    """
    if not args and not kwargs and is_registered_model(fn):
        facts, _ = discover(fn, params, None)
    else:
        facts, _ = observe_layers(as_function(fn, "jlora.find_layouts"), params, *args, **kwargs)
    return {path: fact.layout for path, fact in facts.items()}
