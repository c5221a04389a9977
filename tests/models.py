"""Tiny linen models covering every layer kind jlora adapts."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class Attention(nn.Module):
    """Self-attention with DenseGeneral projections: q/k/v kernels (d, heads, head_dim), out (heads, head_dim, d)."""

    heads: int = 2
    head_dim: int = 4
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        d = x.shape[-1]
        proj = lambda name: nn.DenseGeneral((self.heads, self.head_dim), name=name)  # noqa: E731
        q, k, v = proj("query")(x), proj("key")(x), proj("value")(x)
        weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(self.head_dim))
        weights = nn.Dropout(self.dropout_rate, deterministic=not train)(weights)
        mixed = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return nn.DenseGeneral(d, axis=(-2, -1), name="out")(mixed)


class Block(nn.Module):
    d: int = 8

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x + Attention(name="attn")(nn.LayerNorm(name="ln1")(x), train)
        hidden = nn.gelu(nn.Dense(2 * self.d, name="fc1")(nn.LayerNorm(name="ln2")(x)))
        return x + nn.Dense(self.d, name="fc2")(hidden)


class TinyLM(nn.Module):
    """Embedding -> blocks -> tied read-out via ``Embed.attend`` (+ a Dense head for classification)."""

    vocab: int = 16
    d: int = 8
    layers: int = 2
    scan: bool = False
    remat: bool = False

    @nn.compact
    def __call__(self, ids: jax.Array, train: bool = False) -> jax.Array:
        embed = nn.Embed(self.vocab, self.d, name="embed")
        x = embed(ids)
        block = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
        if self.scan:
            x, _ = nn.scan(_ScanBlock, variable_axes={"params": 0},
                           split_rngs={"params": True, "dropout": True}, length=self.layers,
                           in_axes=nn.broadcast)(d=self.d, remat=self.remat, name="blocks")(x, train)
        else:
            for i in range(self.layers):
                x = block(self.d, name=f"block_{i}")(x, train)
        x = nn.LayerNorm(name="ln_f")(x)
        return embed.attend(x) + nn.Dense(self.vocab, name="head")(x)


class _ScanBlock(nn.Module):
    d: int = 8
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, None]:
        block = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
        return block(self.d, name="block")(x, train), None


class MLP(nn.Module):
    """Two Dense layers and a classifier head: the simplest target."""

    hidden: int = 16
    classes: int = 3

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Dense(self.hidden, name="fc1")(x))
        x = nn.relu(nn.Dense(self.hidden, name="fc2")(x))
        return nn.Dense(self.classes, name="classifier")(x)


def init_model(model: nn.Module, *shape_dtype, seed: int = 0):
    """``model.init`` on zeros of the given (shape, dtype) pairs."""
    inputs = [jnp.zeros(s, d) for s, d in shape_dtype]
    return model.init(jax.random.key(seed), *inputs)


def randomize_lora(lora, seed: int = 1, scale: float = 0.3):
    """Adapters with non-zero lora_b, so the adapted model differs from the base."""
    leaves, treedef = jax.tree_util.tree_flatten(lora)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
