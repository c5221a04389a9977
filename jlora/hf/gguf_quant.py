"""GGUF tensors kept quantized: llama.cpp's Q4_0 / Q4_1 / Q8_0 blocks as :class:`GGMLKernel` leaves.

A GGUF tensor of ggml shape ``[in, out]`` (``tensor.shape``; ggml lists the contiguous axis first)
is ``out`` rows of ``in / 32`` blocks, each block 32 consecutive elements of one row (``gguf``'s
``tensor.data`` is uint8 ``(out, in / 32 * type_size)``). Block layouts (``gguf.quants``,
llama.cpp's ``block_q4_0`` / ``block_q4_1`` / ``block_q8_0``), little-endian:

- Q4_0, 18 bytes: ``d`` float16, ``qs`` 16 bytes;          ``w[j] = d * (q[j] - 8)``
- Q4_1, 20 bytes: ``d`` float16, ``m`` float16, ``qs`` 16;  ``w[j] = d * q[j] + m``
- Q8_0, 34 bytes: ``d`` float16, ``qs`` 32 int8;            ``w[j] = d * q[j]``

where for the 4-bit types byte ``j`` of ``qs`` holds ``q[j]`` in its low nibble and ``q[j + 16]``
in its high one. A Flax kernel is ``(in, out)`` = the transposed rows, and :class:`GGMLKernel`
keeps its blocks along ``axis=-2`` (fan_in) with that same in-block nibble order, so
:func:`ggml_kernel` only splits and transposes bytes (no float arithmetic); its ``dequantize()``
reproduces ``gguf.quants.dequantize`` bit for bit.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jlora.qformats import GGML_BLOCK, GGMLKernel

KINDS = {"Q4_0": "q4_0", "Q4_1": "q4_1", "Q8_0": "q8_0"}  # ggml type name -> GGMLKernel.kind
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")  # stored as plain floats: nothing to keep quantized


def _type_name(tensor_type: Any) -> str:
    return getattr(tensor_type, "name", str(tensor_type))


def is_float_type(tensor_type: Any) -> bool:
    """Whether a ggml tensor type (``gguf.GGMLQuantizationType``) stores plain floats, not blocks."""
    return _type_name(tensor_type) in FLOAT_TYPES


def ggml_kernel(tensor_data: np.ndarray, tensor_type: Any, shape: Sequence[int], *, name: str = "tensor",
                dtype: Any = np.float32) -> GGMLKernel:
    """One GGUF tensor's Q4_0 / Q4_1 / Q8_0 blocks as a :class:`GGMLKernel` of Flax shape ``(in, out)``.

    ``tensor_data``: the tensor's raw bytes as ``gguf.GGUFReader`` gives them (uint8
    ``(out, in / 32 * type_size)``, or anything that reshapes to it); ``tensor_type``: its
    ``gguf.GGMLQuantizationType``; ``shape``: its ggml shape ``[in, out]`` (``tensor.shape``),
    which is also the Flax kernel's. The result holds, as numpy arrays (bytes unchanged, only
    transposed):

    - ``codes``: uint8 ``(in / 2, out)`` for Q4_0/Q4_1 (``codes[16 b + j, o]`` = byte ``j`` of
      ``qs`` of block ``b`` of row ``o``), int8 ``(in, out)`` for Q8_0;
    - ``d`` (and ``m`` for Q4_1): float16 ``(in / 32, out)``.

    Raises ValueError naming ``name`` for any other block type (Q5_0, Q6_K, ...: the supported ones
    are listed), a tensor that is not 2-D, or bytes that do not match ``shape``.
    """
    kind = KINDS.get(_type_name(tensor_type))
    if kind is None:
        raise ValueError(f"GGUF tensor {name!r}: block type {_type_name(tensor_type)} cannot be kept quantized; "
                         f"supported: {', '.join(KINDS)} (load with quantized=False to dequantize it to float32)")
    if len(shape) != 2:
        raise ValueError(f"GGUF tensor {name!r}: expected a 2-D [in, out] tensor, got ggml shape {tuple(shape)}")
    fan_in, fan_out = (int(s) for s in shape)
    if fan_in % GGML_BLOCK:
        raise ValueError(f"GGUF tensor {name!r}: row length {fan_in} is not a multiple of the block size {GGML_BLOCK}")
    type_size = {"q4_0": 18, "q4_1": 20, "q8_0": 34}[kind]
    data = np.asarray(tensor_data)
    if data.dtype != np.uint8 or data.size != fan_out * (fan_in // GGML_BLOCK) * type_size:
        raise ValueError(f"GGUF tensor {name!r}: {data.dtype}{data.shape} is not the {kind.upper()} bytes of a "
                         f"[{fan_in}, {fan_out}] tensor ({fan_out} rows of {fan_in // GGML_BLOCK} blocks of "
                         f"{type_size} bytes)")
    blocks = np.ascontiguousarray(data).reshape(fan_out, fan_in // GGML_BLOCK, type_size)

    def half(offset: int) -> np.ndarray:  # a float16 field of every block, as (in / 32, out)
        return np.ascontiguousarray(blocks[:, :, offset:offset + 2]).view(np.float16)[..., 0].T.copy()

    start = 4 if kind == "q4_1" else 2
    qs = blocks[:, :, start:].reshape(fan_out, -1)  # row o: its blocks' qs bytes, block after block
    codes = np.ascontiguousarray(qs.T)
    if kind == "q8_0":
        codes = codes.view(np.int8)
    return GGMLKernel(codes=codes, d=half(0), m=half(2) if kind == "q4_1" else None, kind=kind, axis=-2,
                      dtype_name=np.dtype(dtype).name)


def permute_fan_out(kernel: GGMLKernel, index: np.ndarray) -> GGMLKernel:
    """``kernel`` with its output columns reordered: column ``i`` of the result is column ``index[i]``
    (as ``W[:, index]`` of the dequantized kernel, exactly; blocks run along fan_in, so each column's
    blocks move whole). For GGUF's rotary row permutation of the q/k projections."""
    index = np.asarray(index)
    if index.shape != (kernel.shape[-1],):
        raise ValueError(f"permute_fan_out: expected {kernel.shape[-1]} column indices, got shape {index.shape}")

    def take(x: Any) -> Any:
        return None if x is None else np.ascontiguousarray(np.take(np.asarray(x), index, axis=-1))

    return kernel.replace(codes=take(kernel.codes), d=take(kernel.d), m=take(kernel.m))
