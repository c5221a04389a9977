"""Which layers jlora adapts, and reading them off a model.

Integrations register what jlora's core cannot know by itself (``jlora.hf`` registers HF Flax models,
GPT-2's ``FlaxConv1D`` and GPT-2's params layout); :func:`observe_layers` runs a model abstractly
(``jax.eval_shape``: no FLOPs) and records each adaptable layer's class and kernel layout, and every
Dense-like head whose kernel is not a param of its own (a tied head).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax

from jlora.tree import COLLECTION, Tree, flatten, is_variables_dict


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
            raise ValueError(f"layouts[{where!r}]: {self} does not fit a kernel of shape {shape}: it needs at "
                             "least one input and one output axis after the stacked ones (exactly one each "
                             "when transposed)")
        stack, rest = shape[:self.stack_dims], shape[self.stack_dims:]
        if self.transposed:
            return stack, rest[1:], rest[:1]
        return stack, rest[:self.in_dims], rest[self.in_dims:]


# --- what integrations register --------------------------------------------------------------
_TRANSPOSED_LAYERS: set[str] = set()      # layer class names storing (fan_out, fan_in), contracting x[..., -1]
_PARAMS_RULES: list[Callable[[Tree, str], bool]] = []   # (params, module path) -> stored transposed?
_MODEL_KINDS: list[tuple[Callable[[Any], bool], Callable[[Any], Callable], Callable[[Any, Tree], Any]]] = []


def register_transposed_layer(class_name: str) -> None:
    """Declare a layer class whose kernel is stored ``(fan_out, fan_in)`` and that contracts the last
    input axis (GPT-2's ``FlaxConv1D``); ``apply`` adapts it like ``nn.Dense``."""
    _TRANSPOSED_LAYERS.add(class_name)


def register_params_rule(rule: Callable[[Tree, str], bool]) -> None:
    """``rule(params, module_path) -> True`` when that 2-D kernel is stored transposed (used when no
    model is at hand)."""
    _PARAMS_RULES.append(rule)


def stored_transposed(params: Tree, module_path: str) -> bool:
    """Whether a registered params rule reads the 2-D kernel at ``module_path`` as (fan_out, fan_in)."""
    return any(rule(params, module_path) for rule in _PARAMS_RULES)


def register_model_kind(matches: Callable[[Any], bool], as_function: Callable[[Any], Callable],
                        dummy_call: Callable[[Any, Tree], Any]) -> None:
    """Teach jlora a model object: ``as_function(model)`` is ``f(params, *args, **kw)``;
    ``dummy_call(model, params)`` runs it once on dummy inputs (for layer discovery)."""
    _MODEL_KINDS.append((matches, as_function, dummy_call))


def _model_kind(model: Any):
    return next((kind for kind in _MODEL_KINDS if kind[0](model)), None)


def is_registered_model(obj: Any) -> bool:
    """Whether ``obj`` is a model object of a registered kind (e.g. an HF Flax model)."""
    return _model_kind(obj) is not None


def as_function(fn: Any, caller: str = "jlora.apply") -> Callable:
    """``fn`` itself, or for a registered model object (an HF Flax model) its params function."""
    kind = _model_kind(fn)
    if kind is not None:
        return kind[1](fn)
    if not callable(fn):
        raise TypeError(f"{caller}: fn must be callable (e.g. module.apply) or an HF Flax model, "
                        f"got {type(fn).__name__}")
    return fn


def is_transposed_layer(module: nn.Module) -> bool:
    return type(module).__name__ in _TRANSPOSED_LAYERS


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Dense, nn.DenseGeneral, nn.Embed)) or is_transposed_layer(module)


def first_input(args: tuple, kwargs: dict) -> Any:
    """A layer call's input: its first positional argument, else its first keyword argument."""
    if args:
        return args[0]
    if kwargs:
        return next(iter(kwargs.values()))
    raise TypeError("LoRA layer called without inputs")


def checked_axes(module: nn.Module, x: Any, lora_a: Any, problem: str) -> tuple[int, ...]:
    """The layer's contracted axes, after checking that ``x``'s fan_in is ``lora_a``'s (``(..., *fan_in, r)``);
    else a ValueError: ``problem`` formatted with ``fan_in`` (the inputs') and ``shape`` (``lora_a``'s)."""
    axes = contracted_axes(module)
    fan_in = tuple(x.shape[a] for a in axes)
    if fan_in != tuple(lora_a.shape[-1 - len(axes):-1]):
        raise ValueError(problem.format(fan_in=fan_in, shape=tuple(lora_a.shape)))
    return axes


def contracted_axes(module: nn.Module) -> tuple[int, ...]:
    """The input axes a Dense-like layer contracts (``DenseGeneral.axis``; ``(-1,)`` otherwise)."""
    if isinstance(module, nn.DenseGeneral):
        batch_dims = module.batch_dims if isinstance(module.batch_dims, tuple) else (module.batch_dims,)
        if batch_dims:
            raise NotImplementedError(f"jlora: DenseGeneral at {'/'.join(module.path)!r} has batch_dims="
                                      f"{module.batch_dims}; LoRA on batched kernels is not supported")
        return tuple(module.axis) if isinstance(module.axis, (tuple, list)) else (module.axis,)
    return (-1,)


# --- discovery -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LayerFact:
    layer: str
    layout: KernelLayout


def observe_layers(fn: Callable, params: Tree, *args: Any, **kwargs: Any
                   ) -> tuple[dict[str, LayerFact], dict[str, tuple[int, ...]]]:
    """Run ``fn(params, *args, **kwargs)`` abstractly and record each adaptable layer call.

    Returns ``(facts, heads)``: ``facts[path]`` the layer class and kernel layout of every layer
    whose kernel is in ``params``; ``heads[path]`` the kernel shape of every Dense-like call whose
    kernel is *not* in ``params`` (a head built from another leaf, e.g. a tied embedding).
    """
    flat = flatten(params)
    prefix = (COLLECTION,) if is_variables_dict(params) else ()
    facts: dict[str, LayerFact] = {}
    heads: dict[str, tuple[int, ...]] = {}

    def record(next_fun: Callable, a: tuple, kw: dict, context: Any) -> Any:
        module = context.module
        out = next_fun(*a, **kw)
        if context.method_name == "__call__" and is_adaptable(module) and not inside_dequantized_call():
            leaf = "embedding" if isinstance(module, nn.Embed) else "kernel"
            seen = module.get_variable(COLLECTION, leaf)
            stored = flat.get((*prefix, *module.path, leaf))
            path = "/".join(module.path)
            if seen is not None and stored is not None:
                facts[path] = LayerFact(type(module).__name__, KernelLayout(
                    stack_dims=stored.ndim - seen.ndim, in_dims=len(contracted_axes(module))
                    if leaf == "kernel" else 1, transposed=is_transposed_layer(module)))
            elif seen is not None and leaf == "kernel":
                heads[path] = tuple(seen.shape)
        return out

    from jlora.qlayers import inside_dequantized_call, quantized_layers  # a quantized base runs as in apply
    with nn.intercept_methods(record), quantized_layers():
        jax.eval_shape(lambda p: fn(p, *args, **kwargs), params)
    return facts, heads


def discover(model: Any, params: Tree, inputs: tuple | None
             ) -> tuple[dict[str, LayerFact], dict[str, tuple[int, ...]]]:
    """:func:`observe_layers` for a registered model object (dummy inputs) or ``fn`` with ``inputs``."""
    kind = _model_kind(model)
    if kind is not None:
        return observe_layers(lambda p: kind[2](model, p), params)
    if not callable(model):
        raise TypeError(f"model: expected an HF Flax model or a function such as module.apply, got "
                        f"{type(model).__name__}")
    if isinstance(model, nn.Module):
        model = model.apply
    if inputs is None:
        raise ValueError("inputs: a linen model is discovered by running it; pass example inputs, e.g. "
                         "jlora.init(rng, params, config, model=module.apply, inputs=(x,))")
    return observe_layers(model, params, *(inputs if isinstance(inputs, tuple) else (inputs,)))


def tables_read_transposed(head_shape: tuple[int, ...], tables: Mapping[str, tuple[int, ...]]) -> list[str]:
    """The embedding tables (``{path: (vocab, dim)}``) whose transpose has the head kernel's shape."""
    return [path for path, shape in tables.items() if tuple(reversed(shape)) == tuple(head_shape)]


def tied_heads_of(heads: Mapping[str, tuple[int, ...]], table: str,
                  tables: Mapping[str, tuple[int, ...]]) -> tuple[str, ...]:
    """The head calls that read ``table`` transposed, and no other table of ``tables`` (unambiguous)."""
    return tuple(head for head, shape in heads.items() if tables_read_transposed(shape, tables) == [table])
