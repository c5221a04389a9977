"""Property tests (hypothesis): merge folds scale*A@B exactly where it should, unmerge inverts it."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jlora

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@st.composite
def kernel_and_adapter(draw):
    stack = tuple(draw(st.lists(st.integers(1, 3), max_size=1)))
    fan_in = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=2)))
    fan_out = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=2)))
    rank = draw(st.integers(1, min(math.prod(fan_in), math.prod(fan_out))))
    transposed = len(fan_in) == len(fan_out) == 1 and draw(st.booleans())
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    alpha = draw(st.sampled_from([1.0, 8.0, 32.0]))
    rslora = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return stack, fan_in, fan_out, rank, transposed, dtype, alpha, rslora, seed


def build(stack, fan_in, fan_out, rank, transposed, dtype, alpha, rslora, seed):
    shape = (*stack, *(fan_out + fan_in if transposed else fan_in + fan_out))
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    kernel = jax.random.normal(k1, shape, jnp.float32).astype(DTYPES[dtype])
    params = {"blk": {"proj": {"kernel": kernel, "bias": jnp.ones(fan_out[:1])}}}
    lora = {"blk": {"proj": {"lora_a": jax.random.normal(k2, (*stack, *fan_in, rank)).astype(DTYPES[dtype]),
                             "lora_b": jax.random.normal(k3, (*stack, rank, *fan_out)).astype(DTYPES[dtype])}}}
    config = jlora.LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora, target_modules=("proj",),
                              fan_in_fan_out=transposed)
    return params, lora, config


@settings(max_examples=60, deadline=None)
@given(kernel_and_adapter())
def test_unmerge_inverts_merge(case):
    params, lora, config = build(*case)
    kernel = params["blk"]["proj"]["kernel"]
    merged = jlora.merge(params, lora, config)
    back = jlora.unmerge(merged, lora, config)
    assert back["blk"]["proj"]["kernel"].dtype == kernel.dtype
    np.testing.assert_array_equal(back["blk"]["proj"]["bias"], params["blk"]["proj"]["bias"])
    update = config.scale_for("blk/proj") * jlora.delta(lora["blk"]["proj"]["lora_a"], lora["blk"]["proj"]["lora_b"],
                                                        kernel.shape, transposed=config.fan_in_fan_out)
    # two roundings to the kernel's dtype, each at most half an ulp of |W| + |scale*A@B|
    eps = float(jnp.finfo(kernel.dtype).eps)
    bound = 2 * eps * (np.abs(np.asarray(kernel, np.float32)) + np.abs(np.asarray(update)) + 1e-30)
    err = np.abs(np.asarray(back["blk"]["proj"]["kernel"], np.float32) - np.asarray(kernel, np.float32))
    assert np.all(err <= bound)


@settings(max_examples=40, deadline=None)
@given(kernel_and_adapter())
def test_merge_adds_scaled_product(case):
    stack, fan_in, fan_out, rank, transposed, _, alpha, rslora, seed = case
    params, lora, config = build(stack, fan_in, fan_out, rank, transposed, "float32", alpha, rslora, seed)
    a, b = (np.asarray(lora["blk"]["proj"][k], np.float64) for k in ("lora_a", "lora_b"))
    prod = np.einsum("...ir,...ro->...io", a.reshape(*stack, -1, rank), b.reshape(*stack, rank, -1))
    if transposed:
        prod = np.swapaxes(prod, -1, -2)
    scale = alpha / (math.sqrt(rank) if rslora else rank)
    expected = np.asarray(params["blk"]["proj"]["kernel"], np.float64) + scale * prod.reshape(
        params["blk"]["proj"]["kernel"].shape)
    np.testing.assert_allclose(jlora.merge(params, lora, config)["blk"]["proj"]["kernel"], expected,
                               rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_merge_rejects_adapter_of_wrong_shape():
    params, lora, config = build((), (4,), (5,), 2, False, "float32", 8.0, False, 0)
    lora["blk"]["proj"]["lora_a"] = jnp.zeros((3, 2))
    with pytest.raises(ValueError, match=r"lora at 'blk/proj': lora_a \(3, 2\) and lora_b \(2, 5\) do not fit "
                                         r"the kernel \(4, 5\)"):
        jlora.merge(params, lora, config)


def test_merge_rejects_adapter_for_another_tree():
    params, lora, config = build((), (4,), (5,), 2, False, "float32", 8.0, False, 0)
    with pytest.raises(ValueError, match=r"no kernel or embedding at 'blk/other' in params"):
        jlora.merge(params, {"blk": {"other": lora["blk"]["proj"]}}, config)


def test_merge_rejects_rank_that_disagrees_with_config():
    params, lora, _ = build((), (4,), (5,), 2, False, "float32", 8.0, False, 0)
    with pytest.raises(ValueError, match=r"lora at 'blk/proj' has rank 2 but the config gives rank 3"):
        jlora.merge(params, lora, jlora.LoraConfig(r=3, target_modules=("proj",)))
