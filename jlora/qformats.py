"""Quantized kernels: pytree leaves holding packed codes and scales, and their exact dequantization.

A quantized kernel replaces a float kernel ``W`` of shape ``S`` in a params tree. Its arrays keep
``S``'s rank and axis order (only the *block axis* ``axis`` is shortened), so they slice along
leading ``nn.scan`` stack axes and shard along the kernel's axes like ``W`` itself. ``axis`` is
negative (counted from the end) and stays right when leading axes are sliced off. The block axis
is the kernel's contracted (fan_in) axis, so the blocks run along what each output column sums.

Formats (``n = S[axis]``; "block" = consecutive elements along ``axis``):

- :class:`Int8Kernel` (``"int8"``): per-output-channel absmax.
  ``codes int8 S``, ``scale float32 S with S[axis] = 1``; ``W ≈ codes * scale``,
  ``scale = max|W| / 127`` over the block axis.
- :class:`NF4Kernel` (``"nf4"``, QLoRA, Dettmers et al. 2023): blocks of 64, each normalised by its
  absmax ``s`` and rounded to the nearest of the 16 NormalFloat levels :data:`NF4_LEVELS`; two
  4-bit codes per byte (element ``j`` of a block in the low nibble of byte ``j``, element
  ``j + 32`` in the high one): ``codes uint8 S with S[axis] = n / 2``. Double quantization: the
  block absmaxes ``s`` (one per block, ``S[axis] = n / 64``) are stored as uint8 codes of ``log2 s``,
  in second-level blocks of 256 along the other kernel axis ``axis2``, each with its own minimum and
  step: ``s ≈ 2 ** (scale_min + scale_step * scale_codes)``. In the log domain every scale keeps the
  same *relative* precision (half a step: ~0.5% when a block's scales span 10x), so one outlier
  channel does not coarsen its neighbours' scales (a linear int8 code around the mean did: 25%
  error at a 100x outlier). ~0.52 bytes per weight.
- :class:`GGMLKernel` (``"q4_0"``, ``"q4_1"``, ``"q8_0"``): llama.cpp's blocks of 32 as a GGUF
  file stores them, bytes unchanged (only transposed to the kernel's ``(in, out)`` layout):
  ``q4_0``: ``d * (q - 8)``; ``q4_1``: ``d * q + m``; ``q8_0``: ``d * q`` with ``d``, ``m`` float16
  per block and ``q`` 4-bit (nibble order as NF4's, with half-block 16) or int8.

Every kernel has ``shape``, ``ndim``, ``dtype`` (of the dequantized kernel), ``nbytes`` and
:meth:`dequantize`, so shape-reading code treats it like the array it stands for.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# The 16 NormalFloat4 levels (QLoRA, Appendix E): quantiles of N(0, 1) scaled to [-1, 1], exact zero.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)
NF4_BLOCK = 64
SCALE_BLOCK = 256
GGML_BLOCK = 32
FORMATS = ("int8", "nf4", "q4_0", "q4_1", "q8_0")


def _pos(axis: int, ndim: int) -> int:
    return axis % ndim


def _blocks(x: Array, axis: int, block: int) -> Array:
    """``x`` with ``axis`` split into ``(n // block, block)``."""
    a = _pos(axis, x.ndim)
    return x.reshape(*x.shape[:a], x.shape[a] // block, block, *x.shape[a + 1:])


def _unblock(x: Array, axis: int) -> Array:
    """Inverse of :func:`_blocks` (``axis`` counts in the unblocked rank)."""
    a = _pos(axis, x.ndim - 1)
    return x.reshape(*x.shape[:a], x.shape[a] * x.shape[a + 1], *x.shape[a + 2:])


def unpack_nibbles(codes: Array, axis: int, half: int) -> Array:
    """uint8 codes packed along ``axis`` (``n / 2``) -> uint8 values along ``axis`` (``n``): in each
    run of ``half`` bytes, the low nibbles are the block's first ``half`` elements, the high ones
    its last ``half``."""
    packed = _blocks(codes, axis, half)
    a = _pos(axis, codes.ndim) + 1
    return _unblock(jnp.concatenate([packed & 0x0F, packed >> 4], axis=a), axis)


def pack_nibbles(values: Array, axis: int, half: int) -> Array:
    """Inverse of :func:`unpack_nibbles` (``values`` in 0..15)."""
    blocks = _blocks(values.astype(jnp.uint8), axis, 2 * half)
    a = _pos(axis, values.ndim) + 1
    low, high = jnp.split(blocks, 2, axis=a)
    return _unblock(low | (high << 4), axis)


def _expand(scale: Array, axis: int) -> Array:
    """A per-block scale ``(..., nb, ...)`` -> ``(..., nb, 1, ...)`` to broadcast over blocked values."""
    return jnp.expand_dims(scale, _pos(axis, scale.ndim) + 1)


FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)


def float_dtype(dtype: Any, caller: str) -> Any:
    """``dtype`` (None: keep each kernel's own) checked to be a floating-point dtype, named ``dtype=``
    by ``caller`` when not: integer codes would dequantize to zeros and a merge would truncate."""
    if dtype is None:
        return None
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or not jnp.issubdtype(resolved, jnp.floating):
        raise ValueError(f"{caller}: dtype= must be a floating-point dtype (the dtype kernels dequantize to), e.g. "
                         f"jnp.bfloat16 or 'float32'; got {getattr(resolved, 'name', None) or repr(dtype)}")
    return resolved


def _check_dtypes(kernel: Any, **expected: tuple) -> None:
    """Refuse arrays of the wrong dtype, e.g. codes cast by ``jax.tree.map(lambda x: x.astype(...))``."""
    for name, dtypes in expected.items():
        dtype = jnp.result_type(getattr(kernel, name))
        if dtype not in [jnp.dtype(d) for d in dtypes]:
            raise ValueError(f"{type(kernel).__name__} ({kernel.format}): its {name} are {dtype}, expected "
                             f"{' or '.join(jnp.dtype(d).name for d in dtypes)}: was the quantized tree cast, e.g. by "
                             "jax.tree.map(lambda x: x.astype(...), params)? That casts codes and scales too; pass "
                             "dtype= to jlora.quantize for the dtype kernels dequantize to, and give tree.map "
                             "is_leaf=jlora.is_quantized to skip quantized kernels")


class _QuantizedArrayLike:
    """What every quantized kernel shares: ``T`` (2-D: a tied head reads the table transposed) and a
    clear error where it is used as a plain array (outside ``jlora.apply`` / ``quantized_layers``)."""

    @property
    def T(self) -> Any:  # noqa: N802 (numpy's name)
        if self.ndim != 2:
            raise ValueError(f"{type(self).__name__}.T: only 2-D quantized kernels transpose, this one is {self.shape}")
        swap = {-2: -1, -1: -2}
        fields = {"axis": swap[self.axis], **({"axis2": swap[self.axis2]} if hasattr(self, "axis2") else {})}
        return jax.tree_util.tree_map(lambda a: a.T, self).replace(**fields)

    def __jax_array__(self) -> Array:
        raise TypeError(f"a quantized kernel ({type(self).__name__}, {self.format}, shape {self.shape}) was used as an "
                        "array: call the model through jlora.apply (or jlora.generate), or under `with "
                        "jlora.quantized_layers():`, which compute its layers over it; jlora.dequantize(params) gives a "
                        "float tree")

    __array__ = __jax_array__


def nf4_levels(index: Array, zero: Array | float = 0.0) -> Array:
    """``NF4_LEVELS[index]`` (float32) as a tree of 15 selects on the index's 4 bits: elementwise, so
    XLA fuses it into the dequantization (a gather from the table is not fused on CPU, and would
    write a float32 copy of the whole kernel first). ``zero``: a traced 0 added to the 16 levels, so
    that they are not constants, whose kernel-sized broadcasts XLA would hoist out of an ``nn.scan``
    loop and keep (~0.7 GB at TinyLlama's shape)."""
    bits = [(index >> b) & 1 for b in range(4)]
    level = [jnp.float32(v) + zero for v in NF4_LEVELS]
    for bit in bits:  # each round halves the candidates: pairs (2k, 2k+1) chosen by the lowest bit left
        level = [jnp.where(bit == 1, level[2 * k + 1], level[2 * k]) for k in range(len(level) // 2)]
    return level[0]


@flax.struct.dataclass
class Int8Kernel(_QuantizedArrayLike):
    """int8 codes with one float32 absmax scale per output channel (see the module docstring)."""

    codes: Array
    scale: Array
    axis: int = flax.struct.field(pytree_node=False, default=-2)
    dtype_name: str = flax.struct.field(pytree_node=False, default="float32")
    format = "int8"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype: Any = None) -> Array:
        """``codes * scale`` in float32, cast to ``dtype`` (default: the original kernel's)."""
        _check_dtypes(self, codes=(jnp.int8,), scale=FLOATS)
        return (self.codes.astype(jnp.float32) * self.scale.astype(jnp.float32)).astype(dtype or self.dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self) -> np.dtype:
        return jnp.dtype(self.dtype_name)

    @property
    def nbytes(self) -> int:
        return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self))


@flax.struct.dataclass
class NF4Kernel(_QuantizedArrayLike):
    """NF4 codes, blocks of 64, double-quantized block scales (see the module docstring)."""

    codes: Array
    scale_codes: Array
    scale_min: Array
    scale_step: Array
    axis: int = flax.struct.field(pytree_node=False, default=-2)
    axis2: int = flax.struct.field(pytree_node=False, default=-1)
    dtype_name: str = flax.struct.field(pytree_node=False, default="float32")
    format = "nf4"

    shape = property(lambda self: tuple(d * 2 if i == _pos(self.axis, self.codes.ndim) else d
                                        for i, d in enumerate(self.codes.shape)))
    ndim = property(lambda self: self.codes.ndim)
    dtype = Int8Kernel.dtype
    nbytes = Int8Kernel.nbytes

    def block_scales(self) -> Array:
        """The float32 absmax of every block of 64, from its uint8 log code: ``(..., n / 64, ...)``."""
        second = self.scale_codes.shape[self.axis2] // self.scale_min.shape[self.axis2]
        codes = _blocks(self.scale_codes.astype(jnp.float32), self.axis2, second)
        logs = _expand(self.scale_min, self.axis2) + codes * _expand(self.scale_step, self.axis2)
        return _unblock(jnp.exp2(logs), self.axis2)

    def dequantize(self, dtype: Any = None) -> Array:
        """``NF4_LEVELS[code] * block absmax``, in float32, cast to ``dtype``."""
        _check_dtypes(self, codes=(jnp.uint8,), scale_codes=(jnp.uint8,), scale_min=FLOATS, scale_step=FLOATS)
        zero = self.scale_min.reshape(-1)[0].astype(jnp.float32) * 0.0  # 0, but not a constant (see nf4_levels)
        levels = nf4_levels(unpack_nibbles(self.codes, self.axis, NF4_BLOCK // 2), zero)
        values = _blocks(levels, self.axis, NF4_BLOCK) * _expand(self.block_scales(), self.axis)
        return _unblock(values, self.axis).astype(dtype or self.dtype)


@flax.struct.dataclass
class GGMLKernel(_QuantizedArrayLike):
    """llama.cpp's Q4_0 / Q4_1 / Q8_0 blocks of 32 along the block axis, bytes as in the GGUF file."""

    codes: Array
    d: Array
    m: Array | None = None
    kind: str = flax.struct.field(pytree_node=False, default="q4_0")
    axis: int = flax.struct.field(pytree_node=False, default=-2)
    dtype_name: str = flax.struct.field(pytree_node=False, default="float32")

    format = property(lambda self: self.kind)
    shape = property(lambda self: tuple(d * (1 if self.kind == "q8_0" else 2) if i == _pos(self.axis, self.codes.ndim)
                                        else d for i, d in enumerate(self.codes.shape)))
    ndim = property(lambda self: self.codes.ndim)
    dtype = Int8Kernel.dtype
    nbytes = Int8Kernel.nbytes

    def dequantize(self, dtype: Any = None) -> Array:
        """llama.cpp's formula in float32 (``gguf.quants.dequantize``'s, bit for bit), cast to ``dtype``."""
        _check_dtypes(self, codes=(jnp.int8,) if self.kind == "q8_0" else (jnp.uint8,), d=(jnp.float16,),
                      **({"m": (jnp.float16,)} if self.kind == "q4_1" else {}))
        if self.kind == "q8_0":
            q = self.codes.astype(jnp.float32)
        else:
            q = unpack_nibbles(self.codes, self.axis, GGML_BLOCK // 2).astype(jnp.float32)
            if self.kind == "q4_0":
                q = q - 8.0
        values = _blocks(q, self.axis, GGML_BLOCK) * _expand(self.d.astype(jnp.float32), self.axis)
        if self.kind == "q4_1":  # two roundings, as numpy's d * q + m (no fused multiply-add)
            values = jax.lax.optimization_barrier(values) + _expand(self.m.astype(jnp.float32), self.axis)
        return _unblock(values, self.axis).astype(dtype or self.dtype)


QuantizedKernel = Int8Kernel | NF4Kernel | GGMLKernel


def is_quantized(x: Any) -> bool:
    """Whether ``x`` is a quantized kernel leaf."""
    return isinstance(x, (Int8Kernel, NF4Kernel, GGMLKernel))


def quantize_int8(w: Array, axis: int = -2, dtype: Any = None) -> Int8Kernel:
    """Per-output-channel absmax int8: ``scale = max|w| / 127`` along ``axis``, ``codes = round(w / scale)``."""
    x = jnp.asarray(w, jnp.float32)
    absmax = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
    codes = jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8)
    return Int8Kernel(codes=codes, scale=scale, axis=axis, dtype_name=jnp.dtype(dtype or w.dtype).name)


def _second_axis(axis: int, ndim: int) -> int:
    other = [a - ndim for a in range(ndim) if a != _pos(axis, ndim)]
    return other[-1]


def quantize_nf4(w: Array, axis: int = -2, dtype: Any = None) -> NF4Kernel:
    """NF4 with blocks of 64 along ``axis`` and double-quantized scales (see the module docstring).

    Second-level blocks: 256 block scales along the last other axis when it divides by 256,
    otherwise that whole axis (one int8 scale-of-scales and one mean per block either way).
    """
    x = jnp.asarray(w, jnp.float32)
    axis2 = _second_axis(axis, x.ndim)
    blocks = _blocks(x, axis, NF4_BLOCK)
    absmax = jnp.max(jnp.abs(blocks), axis=_pos(axis, x.ndim) + 1)
    safe = jnp.where(absmax > 0, absmax, 1.0)
    normalised = blocks / _expand(safe, axis)
    midpoints = jnp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2)
    index = jnp.searchsorted(midpoints, normalised, side="left").astype(jnp.uint8)
    codes = pack_nibbles(_unblock(index, axis), axis, NF4_BLOCK // 2)
    length = absmax.shape[axis2]
    second = SCALE_BLOCK if length % SCALE_BLOCK == 0 else length
    grouped = _blocks(absmax, axis2, second)
    inner = _pos(axis2, absmax.ndim) + 1
    top = jnp.max(grouped, axis=inner, keepdims=True)
    # an all-zero block decodes to zeros whatever its scale: give it the group's smallest useful one
    floor = jnp.where(top > 0, top * 2.0 ** -40, 1.0)
    logs = jnp.log2(jnp.maximum(jnp.where(grouped > 0, grouped, top), floor))
    low, high = jnp.min(logs, axis=inner), jnp.max(logs, axis=inner)
    step = jnp.where(high > low, (high - low) / 255.0, 1.0)
    scale_codes = jnp.clip(jnp.round((logs - _expand(low, axis2)) / _expand(step, axis2)), 0, 255)
    return NF4Kernel(codes=codes, scale_codes=_unblock(scale_codes, axis2).astype(jnp.uint8), scale_min=low,
                     scale_step=step, axis=axis, axis2=axis2, dtype_name=jnp.dtype(dtype or w.dtype).name)


def quantize_kernel(w: Array, fmt: str, axis: int = -2, dtype: Any = None, where: str = "kernel") -> QuantizedKernel:
    """``w`` quantized in ``fmt`` (``"int8"`` or ``"nf4"``) with blocks along ``axis`` (negative).

    Raises ValueError naming ``where`` when ``w`` is not a float array of >= 2 dims or (NF4) its
    block axis does not divide by 64.
    """
    if fmt not in ("int8", "nf4"):
        raise ValueError(f"quantize {where}: format {fmt!r} is not one jlora quantizes to; expected 'int8' or 'nf4' "
                         "(GGUF's q4_0/q4_1/q8_0 blocks are loaded from a file, not made)")
    if not hasattr(w, "shape") or np.ndim(w) < 2 or not jnp.issubdtype(jnp.asarray(w).dtype, jnp.floating):
        raise ValueError(f"quantize {where}: expected a float kernel of >= 2 dims, got "
                         f"{type(w).__name__} {getattr(w, 'dtype', '')}{tuple(np.shape(w))}")
    dtype = float_dtype(dtype, f"quantize {where}")
    axis = _pos(axis, np.ndim(w)) - np.ndim(w)
    if fmt == "nf4" and np.shape(w)[axis] % NF4_BLOCK:
        raise ValueError(f"quantize {where}: NF4 blocks of {NF4_BLOCK} do not divide its block (fan_in) axis of "
                         f"length {np.shape(w)[axis]} (kernel shape {tuple(np.shape(w))}); leave this kernel "
                         "unquantized (exclude=) or use 'int8'")
    return (quantize_int8 if fmt == "int8" else quantize_nf4)(w, axis, dtype)
