"""apply == merge over layer kind x {tied, fused, transposed storage, stacked, multi-axis DenseGeneral, bf16 base}.

One hypothesis property over a probe model that holds the drawn layer kind: whatever the kind, the
adapted forward (x@W + scale*(x@A)@B, never materialized) equals the base forward on merged
params, unmerge returns the base, and the adapters act. The plan reads every axis role off the model.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

import jlora
from jlora.layerkinds import register_transposed_layer

V, D, HEADS, HEAD_DIM = 11, 6, 2, 3


class TransposedDense(nn.Module):
    """A layer storing its kernel (fan_out, fan_in), like GPT-2's Conv1D; registered as such below."""

    features: int
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(0.3), (self.features, x.shape[-1]), self.param_dtype)
        return x @ kernel.T.astype(x.dtype)


register_transposed_layer("TransposedDense")


class Block(nn.Module):
    kind: str
    fused: bool
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, _=None):
        pd, init = self.param_dtype, nn.initializers.normal(0.3)
        width = 2 * D if self.fused else D
        if self.kind == "dense":
            y = nn.Dense(width, param_dtype=pd, kernel_init=init, name="proj")(x)
        elif self.kind == "transposed":
            y = TransposedDense(width, param_dtype=pd, name="proj")(x)
        elif self.kind == "dense_general":
            h = nn.DenseGeneral((HEADS, HEAD_DIM), param_dtype=pd, kernel_init=init, name="proj")(x)
            y = nn.DenseGeneral(D, axis=(-2, -1), param_dtype=pd, kernel_init=init, name="out")(nn.tanh(h))
        else:  # the embedding is the target: an untargeted mixing layer here
            y = nn.Dense(D, param_dtype=pd, kernel_init=init, name="mix")(x)
        if self.fused:
            y = y.reshape(*y.shape[:-1], 2, D).sum(-2)
        return x + nn.tanh(y.astype(x.dtype)), None


class Probe(nn.Module):
    kind: str
    fused: bool = False
    stacked: bool = False
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.embed = nn.Embed(V, D, param_dtype=self.param_dtype, embedding_init=nn.initializers.normal(0.5))
        block = dict(kind=self.kind, fused=self.fused, param_dtype=self.param_dtype)
        if self.stacked:
            self.blocks = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)(**block)
        else:
            self.blocks = Block(**block)
        self.lm_head = nn.Dense(V, use_bias=False, param_dtype=self.param_dtype)  # tied: kernel = embedding.T

    def __call__(self, ids):
        x = self.embed(ids).astype(jnp.float32)
        x, _ = self.blocks(x, None)
        tied = self.lm_head.apply({"params": {"kernel": self.embed.embedding.T}}, x.astype(self.param_dtype))
        return tied.astype(jnp.float32) + self.embed.attend(x.astype(self.param_dtype)).astype(jnp.float32)


TARGETS = {"dense": ("proj",), "transposed": ("proj",), "dense_general": ("proj", "out"), "embed": ("embed",)}


@st.composite
def cases(draw):
    kind = draw(st.sampled_from(sorted(TARGETS)))
    fused = kind in ("dense", "transposed") and draw(st.booleans())
    return dict(kind=kind, fused=fused, stacked=draw(st.booleans()),
                dtype=draw(st.sampled_from(["float32", "bfloat16"])), rank=draw(st.integers(1, 3)),
                alpha=draw(st.sampled_from([1.0, 4.0, 16.0])), rslora=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)))


@settings(max_examples=30, deadline=None)
@given(cases())
def test_apply_equals_merge_for_every_layer_kind(case):
    dtype = jnp.dtype(case["dtype"])
    model = Probe(case["kind"], case["fused"], case["stacked"], dtype)
    ids = jax.random.randint(jax.random.key(case["seed"]), (2, 5), 0, V)
    params = model.init(jax.random.key(0), ids)
    config = jlora.LoraConfig(r=case["rank"], lora_alpha=case["alpha"], use_rslora=case["rslora"],
                              target_modules=TARGETS[case["kind"]],
                              enable_lora={"proj": (True, False)} if case["fused"] else None)
    f = jlora.apply(model.apply, config)
    lora = f.init(jax.random.key(case["seed"]), params, ids)
    plan = f.plan(params, None, ids)
    if case["kind"] == "transposed":
        assert all(t.layout.transposed and t.layer == "TransposedDense" for t in plan.values())
    if case["stacked"] and case["kind"] != "embed":
        assert all(t.layout.stack_dims == 1 for t in plan.values())
    if case["kind"] == "embed":
        assert plan["embed"].tied_heads == ("",)  # the kernel-less head call reads the table transposed
    leaves, tree = jax.tree_util.tree_flatten(lora)
    keys = jax.random.split(jax.random.key(case["seed"] + 1), len(leaves))
    lora = jax.tree_util.tree_unflatten(tree, [(0.4 * jax.random.normal(k, x.shape)).astype(x.dtype)
                                               for k, x in zip(keys, leaves)])

    adapted = np.asarray(jax.jit(f)(params, lora, ids))
    # the model settles the storage order of a square (d, d) kernel, which the params alone cannot
    merged_params = jlora.merge(params, lora, config, model=model.apply, inputs=(ids,))
    merged = np.asarray(jax.jit(model.apply)(merged_params, ids))
    base = np.asarray(jax.jit(model.apply)(params, ids))
    scale = np.abs(merged).max() + 1e-6
    tol = 5e-2 if dtype == jnp.bfloat16 else 2e-5   # bf16: the merged kernel is rounded to bf16
    assert np.abs(adapted - merged).max() <= tol * scale, (np.abs(adapted - merged).max(), scale)
    assert np.abs(adapted - base).max() > 10 * tol * scale or np.abs(adapted - base).max() > 1e-2
    back = jlora.unmerge(merged_params, lora, config, model=model.apply, inputs=(ids,))
    for got, want in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params)):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   atol=0.05 if dtype == jnp.bfloat16 else 1e-5)
