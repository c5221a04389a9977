"""What jlora's core needs to know about Hugging Face Flax models, supplied through the plan's registry.

* An HF ``FlaxPreTrainedModel`` is called as ``model(*inputs, params=params, **kw)``; for layer
  discovery it runs once on dummy inputs of ``model.input_shape`` (decoder inputs too for
  encoder-decoders).
* GPT-2's ``FlaxConv1D`` stores its kernel (fan_out, fan_in) and contracts the last input axis.
* Without a model at hand, GPT-2's params tree (``transformer/wte`` + ``transformer/h``) is
  recognised and its Conv1D modules (``attn/c_attn``, ``attn/c_proj``, ``mlp/c_fc``,
  ``mlp/c_proj``) are read as stored (fan_out, fan_in).

Nothing here imports transformers: a model is recognised only if transformers is already imported.
"""
from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp

from jlora.layerkinds import register_model_kind, register_params_rule, register_transposed_layer
from jlora.tree import Tree

GPT2_CONV1D = re.compile(r"(?:.*/)?transformer/h/\d+/(?:attn/(?:c_attn|c_proj)|mlp/(?:c_fc|c_proj))")


def is_hf_model(obj: Any) -> bool:
    """A Hugging Face ``FlaxPreTrainedModel`` (transformers 5 has no Flax models: nothing is one there)."""
    transformers = sys.modules.get("transformers")
    flax_model_class = getattr(transformers, "FlaxPreTrainedModel", None) if transformers is not None else None
    return flax_model_class is not None and isinstance(obj, flax_model_class)


def params_function(model: Any) -> Callable:
    """``(params, *a, **kw) -> model(*a, params=params, **kw)``."""
    def call_model(params: Tree, *args: Any, **kwargs: Any) -> Any:
        return model(*args, params=params, **kwargs)
    return call_model


def dummy_call(model: Any, params: Tree) -> Any:
    """``model`` on zeros of its ``input_shape`` (plus ``decoder_input_ids`` if it takes them)."""
    shape = tuple(getattr(model, "input_shape", (1, 1)))
    ids = jnp.zeros(shape, jnp.int32)
    kwargs = {}
    if "decoder_input_ids" in inspect.signature(model.__call__).parameters:
        kwargs["decoder_input_ids"] = ids
    return model(ids, params=params, **kwargs)


def is_gpt2_conv1d(params: Tree, module_path: str) -> bool:
    """GPT-2's Conv1D modules in a params tree that has GPT-2's shape (``transformer/wte``, ``transformer/h``)."""
    root = params.get("transformer") if isinstance(params, Mapping) else None
    if not isinstance(root, Mapping) or "wte" not in root or "h" not in root:
        return False
    return GPT2_CONV1D.fullmatch(module_path) is not None


def register() -> None:
    register_transposed_layer("FlaxConv1D")
    register_params_rule(is_gpt2_conv1d)
    register_model_kind(is_hf_model, params_function, dummy_call)
