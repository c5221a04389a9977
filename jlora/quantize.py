"""QLoRA's frozen base: quantize a params tree's kernels, dequantize it back, count its bytes.

``quantize(params, "nf4")`` is a pure function over the params pytree: the selected kernels become
quantized leaves (:mod:`jlora.qformats`: packed codes + scales, pytrees that shard, scan-slice and
save with orbax like the kernel they replace); everything else is returned as it is. Train LoRA on
top exactly as over a float base::

    qparams = jlora.quantize(params, "nf4")                 # ~0.26x the bytes of a bf16 base
    f = jlora.apply(model, config)                          # dequantizes one layer at a time
    loss = f(qparams, lora, batch)                          # gradients reach lora only
    merged = jlora.merge(qparams, lora, config)             # float kernels, adapters folded in

Default selection: every ``kernel`` of the transformer blocks (a key path with a numeric layer
index, e.g. ``model/layers/3/self_attn/q_proj``); ``lm_head=True`` adds kernels of modules named
``lm_head``, ``embeddings=True`` adds embedding tables; ``include``/``exclude`` (regexes searched
in the module path) override. The block axis of each kernel is its (last) contracted axis, read
from the model for kernels of more than two axes (as :func:`jlora.init` reads its axis roles).
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from jlora.layerkinds import KernelLayout, discover, stored_transposed
from jlora.qformats import FORMATS, float_dtype, is_quantized, quantize_kernel
from jlora.summary import size_of
from jlora.tree import LORA_KEYS, Tree, flatten, is_variables_dict, key_path_str, module_path, unflatten

__all__ = ["quantize", "dequantize", "base_bytes", "is_quantized"]

_BLOCK_INDEX = re.compile(r"(^|/)\d+(/|$)")


def _block_axis(mpath: str, leaf: Any, params: Tree, layout: KernelLayout | None) -> int:
    if layout is not None:
        return -1 if layout.transposed else layout.stack_dims + layout.in_dims - 1 - leaf.ndim
    if leaf.ndim == 2:
        return -1 if stored_transposed(params, mpath) else -2
    raise ValueError(f"quantize: the kernel at {mpath!r} has shape {tuple(leaf.shape)}: with more than two axes "
                     "jlora needs the model to find its contracted axis: jlora.quantize(params, fmt, model=fn, "
                     f"inputs=(example_x,)) or layouts={{{mpath!r}: jlora.KernelLayout(stack_dims=..., in_dims=...)}}")


def _selected(mpath: str, leaf_name: str, include: Sequence[str] | None, exclude: Sequence[str],
              lm_head: bool, embeddings: bool) -> bool:
    if any(re.search(p, mpath) for p in exclude):
        return False
    if include is not None:
        return any(re.search(p, mpath) for p in include)
    if leaf_name == "embedding":
        return embeddings
    if mpath.split("/")[-1] == "lm_head":
        return lm_head
    return bool(_BLOCK_INDEX.search(mpath))


def quantize(params: Tree, fmt: str = "nf4", *, include: Sequence[str] | None = None, exclude: Sequence[str] = (),
             lm_head: bool = False, embeddings: bool = False, dtype: Any = None, model: Any = None,
             inputs: tuple | None = None, layouts: Mapping[str, KernelLayout] | None = None) -> dict[str, Any]:
    """``params`` with the selected kernels quantized in ``fmt`` (``"nf4"`` or ``"int8"``).

    Args:
      params: a linen variables dict or a bare params dict (HF Flax), float kernels.
      fmt: ``"nf4"`` (blocks of 64, double-quantized scales, ~0.52 bytes per weight) or ``"int8"``
        (per-output-channel absmax, ~1 byte per weight).
      include / exclude: regexes searched in each kernel's module path (``include`` replaces the
        default selection, ``exclude`` removes from it).
      lm_head, embeddings: also quantize ``lm_head`` kernels / embedding tables (default: not; tables
        in int8 only, and a tied head reads them transposed).
      dtype: dtype of the dequantized kernels (default: each kernel's own), e.g. ``jnp.bfloat16``.
      model, inputs, layouts: axis roles for kernels of more than two axes (as :func:`jlora.init`).

    Raises:
      ValueError: naming the leaf: an adapter in ``params`` (adapters stay float), nothing selected,
        a kernel whose block axis NF4's blocks of 64 do not divide, an unknown format, a ``dtype`` that
        is not a floating-point dtype.
    """
    if fmt not in ("nf4", "int8"):
        raise ValueError(f"jlora.quantize: fmt must be 'nf4' or 'int8', got {fmt!r} (GGUF files keep their own "
                         f"{[f for f in FORMATS if f.startswith('q')]} blocks: jlora.hf.load_gguf_llama(..., "
                         "quantized=True))")
    dtype = float_dtype(dtype, "jlora.quantize")
    if embeddings and fmt == "nf4":
        raise ValueError("jlora.quantize: embeddings=True with 'nf4': nn.Embed checks its table's shape when it is set "
                         "up, before jlora can dequantize it, and NF4 packs two codes a byte; quantize the tables in "
                         "int8 first: jlora.quantize(jlora.quantize(params, 'int8', include=['embed']), 'nf4')")
    flat = flatten(params)
    in_vars = is_variables_dict(params)
    adapters = [key_path_str(p) for p in flat if p[-1] in LORA_KEYS]
    if adapters:
        raise ValueError(f"jlora.quantize: {adapters[0]!r} is a LoRA adapter leaf; quantize the frozen base only "
                         "(adapters train in float: quantize params before jlora.combine, or pass jlora.partition's "
                         "params)")
    facts = discover(model, params, inputs)[0] if model is not None else {}
    out, done, already = dict(flat), [], []
    for path, leaf in flat.items():
        if path[-1] not in ("kernel", "embedding") or (in_vars and path[0] != "params") \
                or getattr(leaf, "ndim", 0) < 2:
            continue
        mpath = module_path(path, in_vars)
        if not _selected(mpath, path[-1], include, exclude, lm_head, embeddings):
            continue
        if is_quantized(leaf):  # kept as it is (a GGUF file's blocks, an earlier call's)
            already.append(f"{key_path_str(path)} ({leaf.format})")
            continue
        layout = (layouts or {}).get(mpath) or (facts[mpath].layout if mpath in facts else None)
        axis = -1 if path[-1] == "embedding" else _block_axis(mpath, leaf, params, layout)
        out[path] = quantize_kernel(leaf, fmt, axis, dtype, where=key_path_str(path))
        done.append(mpath)
    if not done and already:
        raise ValueError(f"jlora.quantize: every selected kernel is quantized already, e.g. {already[0]}; to change "
                         "the format, quantize the float params (jlora.dequantize(params) gives them back)")
    if not done:
        raise ValueError("jlora.quantize: no kernel was selected: the default takes kernels under a numbered "
                         "transformer block (a path such as 'layers/3/...'); pass include=[regex, ...] to choose "
                         f"(kernels here: {[module_path(p, in_vars) for p in flat if p[-1] == 'kernel'][:6]})")
    return unflatten(out)


def dequantize(params: Tree, dtype: Any = None) -> dict[str, Any]:
    """``params`` with every quantized leaf replaced by its dequantized float kernel (``dtype``:
    default each kernel's original dtype; a floating-point dtype)."""
    dtype = float_dtype(dtype, "jlora.dequantize")
    return unflatten({p: leaf.dequantize(dtype) if is_quantized(leaf) else leaf for p, leaf in flatten(params).items()})


def base_bytes(params: Tree) -> int:
    """Bytes of every array in ``params`` (codes and scales of quantized leaves included)."""
    return size_of(params)[1]
