"""Dropout keys whose masks cost a fraction on CPU: jax's threefry, its rounds unrolled.

``jlora.rng.key(seed)`` is a typed PRNG key that gives **the same bits** as ``jax.random.key(seed)``
(jax's default threefry2x32 with ``jax_threefry_partitionable``, the default since jax 0.5) for
every ``jax.random`` sampler, ``split`` and ``fold_in``, so a run that switches to it draws the
same dropout masks. What differs is how the bits are computed. On CPU jax lowers threefry's 20
rounds as a rolled ``while`` loop (to keep the compiled program small), which XLA runs as five
passes over the whole mask in memory; here the rounds are written out as plain ``jnp`` integer
ops, which XLA fuses into one elementwise kernel. A ``(16, 128, 384)`` Bernoulli mask took 0.8 ms
instead of 6.8 ms on a 2-core Xeon, which is most of the dropout cost of a BERT train step
(BENCHMARKS.md, issue 11). On GPU jax already unrolls the rounds; there the two are alike.

The hash is threefry-2x32 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"):
keys ``(k0, k1)``, ``k2 = k0 ^ k1 ^ 0x1BD11BDA``; counters ``(hi, lo)`` of each element's flat
index; five groups of four mix rounds with rotations (13, 15, 26, 6) / (17, 29, 16, 24), a key
injection after each group. Arrays of 2**32 elements or more fall back to jax's own bits.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.extend.random import define_prng_impl, threefry_prng_impl

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = 0x1BD11BDA


def _rotate_left(x: jax.Array, distance: int) -> jax.Array:
    return (x << jnp.uint32(distance)) | (x >> jnp.uint32(32 - distance))


def threefry2x32(k0: jax.Array, k1: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The threefry-2x32 block function (20 rounds) on uint32 counters ``x0, x1`` under key ``(k0, k1)``."""
    keys = (k0, k1, k0 ^ k1 ^ jnp.uint32(_PARITY))
    x0, x1 = x0 + keys[0], x1 + keys[1]
    for group in range(5):
        for distance in _ROTATIONS[group % 2]:
            x0 = x0 + x1
            x1 = _rotate_left(x1, distance) ^ x0
        x0 = x0 + keys[(group + 1) % 3]
        x1 = x1 + keys[(group + 2) % 3] + jnp.uint32(group + 1)
    return x0, x1


def _random_bits(key: jax.Array, bit_width: int, shape: Sequence[int]) -> jax.Array:
    """jax's partitionable threefry bits: the hash of each element's flat index, halves xor-ed
    (32 bits), or joined (64), or truncated (8, 16)."""
    size = math.prod(shape)
    if size >= 2 ** 32 or not jax.config.jax_threefry_partitionable:
        return threefry_prng_impl.random_bits(key, bit_width, shape)
    low = jax.lax.iota(jnp.uint32, size).reshape(shape)
    bits0, bits1 = threefry2x32(key[0], key[1], jnp.zeros_like(low), low)
    if bit_width == 64:
        return (bits0.astype(jnp.uint64) << jnp.uint64(32)) | bits1.astype(jnp.uint64)
    dtype = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[bit_width]
    return (bits0 ^ bits1).astype(dtype)


IMPL = define_prng_impl(key_shape=threefry_prng_impl.key_shape, seed=threefry_prng_impl.seed,
                        split=threefry_prng_impl.split, random_bits=_random_bits,
                        fold_in=threefry_prng_impl.fold_in, name="threefry2x32_unrolled", tag="tfu")


def key(seed: int | jax.Array) -> jax.Array:
    """A typed PRNG key with the bits of ``jax.random.key(seed)``, computed in one fused kernel on CPU
    (see the module docstring); use it wherever a dropout rng goes (``dropout_rng=``, ``rngs=``)."""
    return jax.random.key(seed, impl=IMPL)
