"""jlora.init: shapes, layouts, determinism, distributions, dtypes."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from models import MLP, TinyLM, init_model

IDS = jnp.zeros((1, 3), jnp.int32)


def test_mirrors_only_targeted_kernels():
    params = init_model(MLP(), ((2, 6), jnp.float32))
    lora = jlora.init(jax.random.key(0), params, jlora.LoraConfig(r=3, target_modules=("fc1", "fc2")))
    shapes = jax.tree_util.tree_map(jnp.shape, lora)
    assert shapes == {"params": {"fc1": {"lora_a": (6, 3), "lora_b": (3, 16)},
                                 "fc2": {"lora_a": (16, 3), "lora_b": (3, 16)}}}
    assert all(not jnp.any(lora["params"][m]["lora_b"]) for m in ("fc1", "fc2"))


def test_bare_params_dict_as_hf_models_have():
    params = init_model(MLP(), ((2, 6), jnp.float32))["params"]
    lora = jlora.init(jax.random.key(0), params, jlora.LoraConfig(r=2, target_modules=("classifier",)))
    assert jax.tree_util.tree_map(jnp.shape, lora) == {"classifier": {"lora_a": (16, 2), "lora_b": (2, 3)}}


def test_layouts_from_the_model_for_dense_general_and_scan():
    model = TinyLM(scan=True, layers=3)
    params = init_model(model, ((1, 3), jnp.int32))
    layouts = jlora.find_layouts(model.apply, params, IDS)
    assert layouts["blocks/block/attn/query"] == jlora.KernelLayout(stack_dims=1, in_dims=1)
    assert layouts["blocks/block/attn/out"] == jlora.KernelLayout(stack_dims=1, in_dims=2)
    assert layouts["embed"] == jlora.KernelLayout(stack_dims=0, in_dims=1)
    config = jlora.LoraConfig(r=2, target_modules=("query", "out", "fc2", "embed"))
    lora = jlora.init(jax.random.key(0), params, config, layouts=layouts)["params"]
    attn = lora["blocks"]["block"]["attn"]
    assert attn["query"]["lora_a"].shape == (3, 8, 2) and attn["query"]["lora_b"].shape == (3, 2, 2, 4)
    assert attn["out"]["lora_a"].shape == (3, 2, 4, 2) and attn["out"]["lora_b"].shape == (3, 2, 8)
    assert lora["blocks"]["block"]["fc2"]["lora_a"].shape == (3, 16, 2)
    assert lora["embed"]["lora_a"].shape == (16, 2)


def test_deterministic_and_independent_of_other_targets():
    params = init_model(MLP(), ((2, 6), jnp.float32))
    one = jlora.init(jax.random.key(4), params, jlora.LoraConfig(r=2, target_modules=("fc1",)))
    two = jlora.init(jax.random.key(4), params, jlora.LoraConfig(r=2, target_modules=("fc2", "fc1")))
    again = jlora.init(jax.random.key(4), params, jlora.LoraConfig(r=2, target_modules=("fc1",)))
    other = jlora.init(jax.random.key(5), params, jlora.LoraConfig(r=2, target_modules=("fc1",)))
    a = one["params"]["fc1"]["lora_a"]
    np.testing.assert_array_equal(a, two["params"]["fc1"]["lora_a"])
    np.testing.assert_array_equal(a, again["params"]["fc1"]["lora_a"])
    assert not np.allclose(a, other["params"]["fc1"]["lora_a"])
    assert not np.allclose(two["params"]["fc1"]["lora_a"][:, :2], two["params"]["fc2"]["lora_a"][:6, :2])


def test_distributions():
    params = {"big": {"kernel": jnp.zeros((400, 300))}, "emb": {"embedding": jnp.zeros((500, 64))}}
    kaiming = jlora.init(jax.random.key(0), params, jlora.LoraConfig(r=16, target_modules=("big", "emb")))
    a = kaiming["big"]["lora_a"]
    bound = 1 / math.sqrt(400)
    assert float(jnp.max(jnp.abs(a))) <= bound and float(jnp.max(jnp.abs(a))) > 0.95 * bound
    assert abs(float(jnp.std(a)) - bound / math.sqrt(3)) < 0.05 * bound
    assert abs(float(jnp.std(kaiming["emb"]["lora_a"])) - 1.0) < 0.05
    gaussian = jlora.init(jax.random.key(0), params,
                          jlora.LoraConfig(r=16, target_modules=("big",), init_lora_weights="gaussian"))
    assert abs(float(jnp.std(gaussian["big"]["lora_a"])) - 1 / 16) < 0.005
    noisy = jlora.init(jax.random.key(0), params,
                       jlora.LoraConfig(r=16, target_modules=("big",), init_lora_weights=False))
    assert float(jnp.std(noisy["big"]["lora_b"])) > 0.1


@pytest.mark.parametrize("kernel, default", [(jnp.bfloat16, jnp.float32), (jnp.float16, jnp.float32),
                                             (jnp.float32, jnp.float32)])
def test_adapters_are_float32_over_narrow_kernels_unless_asked(kernel, default):
    params = {"lin": {"kernel": jnp.zeros((8, 8), kernel)}}
    config = jlora.LoraConfig(r=2, target_modules=("lin",))
    lora = jlora.init(jax.random.key(0), params, config)["lin"]
    assert lora["lora_a"].dtype == lora["lora_b"].dtype == default
    assert jlora.init(jax.random.key(0), params, config, dtype=jnp.bfloat16)["lin"]["lora_b"].dtype == jnp.bfloat16


def test_rank_pattern_sets_per_module_rank():
    params = init_model(MLP(), ((2, 6), jnp.float32))
    config = jlora.LoraConfig(r=2, target_modules=("fc1", "fc2"), rank_pattern={"fc2": 5})
    lora = jlora.init(jax.random.key(0), params, config)
    assert lora["params"]["fc1"]["lora_a"].shape[-1] == 2 and lora["params"]["fc2"]["lora_a"].shape[-1] == 5


def test_init_under_jit_with_static_config():
    params = init_model(MLP(), ((2, 6), jnp.float32))
    config = jlora.LoraConfig(r=2, target_modules=("fc1",))
    jitted = jax.jit(jlora.init, static_argnums=2)(jax.random.key(0), params, config)
    np.testing.assert_array_equal(jitted["params"]["fc1"]["lora_a"],
                                  jlora.init(jax.random.key(0), params, config)["params"]["fc1"]["lora_a"])
