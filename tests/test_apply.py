"""jlora.apply: identity at init, equality with merged params, under jit/pmap/remat/scan/grad."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from models import MLP, TinyLM, init_model, randomize_lora

ALL_KINDS = ("query", "value", "out", "fc1", "embed")  # DenseGeneral (1 and 2 in-axes), Dense, Embed
IDS = jax.random.randint(jax.random.key(7), (2, 5), 0, 16)


def rel_err(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def setup(scan=False, remat=False, targets=ALL_KINDS, r=2):
    model = TinyLM(scan=scan, remat=remat)
    params = init_model(model, ((2, 5), jnp.int32))
    config = jlora.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets)
    lora = jlora.apply(model.apply, config).init(jax.random.key(1), params, IDS)  # axis roles read off the model
    return model, params, config, lora


@pytest.mark.parametrize("scan", [False, True])
def test_identity_at_init_exactly(scan):
    model, params, config, lora = setup(scan=scan)
    f = jax.jit(jlora.apply(model.apply, config))
    np.testing.assert_array_equal(f(params, lora, IDS), jax.jit(model.apply)(params, IDS))


@pytest.mark.parametrize("scan,remat", [(False, False), (True, False), (False, True), (True, True)])
def test_apply_equals_merged(scan, remat):
    model, params, config, lora = setup(scan=scan, remat=remat)
    lora = randomize_lora(lora)
    adapted = jax.jit(jlora.apply(model.apply, config))(params, lora, IDS)
    merged = jax.jit(model.apply)(jlora.merge(params, lora, config), IDS)
    assert rel_err(adapted, merged) <= 1e-5
    assert rel_err(adapted, model.apply(params, IDS)) > 1e-2  # the adapters do act


def test_scanned_layers_get_one_adapter_each():
    model, params, config, lora = setup(scan=True)
    a = lora["params"]["blocks"]["block"]["attn"]["query"]["lora_a"]
    assert a.shape == (2, 8, 2)  # (layers, fan_in, r)
    assert not np.allclose(a[0], a[1])
    # changing layer 1's adapter leaves layer 0's output contribution alone: compare with merged
    lora = randomize_lora(lora)
    out = jlora.apply(model.apply, config)(params, lora, IDS)
    assert rel_err(out, model.apply(jlora.merge(params, lora, config), IDS)) <= 1e-5


def test_grad_through_checkpoint_matches_merged_grad():
    model, params, config, lora = setup(targets=("query", "fc1"))
    lora = randomize_lora(lora)
    f = jlora.apply(model.apply, config)

    def loss_lora(lora_):
        return jnp.mean(jax.checkpoint(f)(params, lora_, IDS) ** 2)

    grads = jax.jit(jax.grad(loss_lora))(lora)
    # the same gradient through the merged kernel, by the chain rule dL/dA = scale * dL/dW @ B.T
    wgrad = jax.grad(lambda p: jnp.mean(model.apply(p, IDS) ** 2))(jlora.merge(params, lora, config))
    dW = wgrad["params"]["block_0"]["fc1"]["kernel"]
    pair = lora["params"]["block_0"]["fc1"]
    expected_a = config.scale_for("block_0/fc1") * dW @ pair["lora_b"].T
    assert rel_err(grads["params"]["block_0"]["fc1"]["lora_a"], expected_a) <= 1e-4


def test_pmap_on_eight_devices():
    assert jax.local_device_count() == 8
    model, params, config, lora = setup()
    lora = randomize_lora(lora)
    ids = jax.random.randint(jax.random.key(3), (8, 2, 5), 0, 16)
    f = jax.pmap(jlora.apply(model.apply, config), in_axes=(None, None, 0))
    out = f(params, lora, ids)
    merged = jlora.merge(params, lora, config)
    expected = jax.vmap(lambda x: model.apply(merged, x))(ids)
    assert rel_err(out, expected) <= 1e-5


def test_pmap_grad_step_replicated():
    model, params, config, lora = setup(targets=("query", "value"))
    lora = randomize_lora(lora)
    f = jlora.apply(model.apply, config)
    ids = jax.random.randint(jax.random.key(3), (8, 2, 5), 0, 16)

    def step(lora_, batch):
        g = jax.grad(lambda l: jnp.mean(f(params, l, batch) ** 2))(lora_)
        return jax.lax.pmean(g, "d")

    grads = jax.pmap(step, axis_name="d", in_axes=(None, 0))(lora, ids)
    single = jax.grad(lambda l: jnp.mean(jax.vmap(lambda b: f(params, l, b))(ids) ** 2))(lora)
    for g, s in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(single)):
        assert rel_err(g[0], s) <= 1e-5


def test_dropout_uses_the_dropout_rng():
    model = MLP()
    params = init_model(model, ((4, 6), jnp.float32))
    config = jlora.LoraConfig(r=2, target_modules=("fc1",), lora_dropout=0.5)
    lora = randomize_lora(jlora.init(jax.random.key(0), params, config))
    f = jlora.apply(model.apply, config)
    x = jax.random.normal(jax.random.key(1), (4, 6))
    no_rng = f(params, lora, x)
    merged = model.apply(jlora.merge(params, lora, config), x)
    assert rel_err(no_rng, merged) <= 1e-5  # no rng: evaluation, dropout off
    a = f(params, lora, x, rngs={"dropout": jax.random.key(5)})
    b = f(params, lora, x, rngs={"dropout": jax.random.key(5)})
    c = f(params, lora, x, rngs={"dropout": jax.random.key(6)})
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, no_rng)


def test_unused_adapter_is_an_error():
    model = MLP()
    params = init_model(model, ((4, 6), jnp.float32))
    config = jlora.LoraConfig(r=2, target_modules=("fc1", "fc2"))
    lora = jlora.init(jax.random.key(0), params, config)

    def only_fc1(variables, x):  # uses the kernels by hand: no nn.Dense call to intercept
        return jax.nn.relu(x @ variables["params"]["fc1"]["kernel"])

    with pytest.raises(ValueError, match=r"adapters at \['fc1', 'fc2'\] were never used"):
        jlora.apply(only_fc1, config)(params, lora, jnp.ones((4, 6)))
    out = jlora.apply(only_fc1, config, allow_unused=True)(params, lora, jnp.ones((4, 6)))
    assert out.shape == (4, 16)


def test_fp32_adapters_over_bf16_base():
    model = MLP()
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16),
                                    init_model(model, ((4, 6), jnp.float32)))
    config = jlora.LoraConfig(r=2, target_modules=("fc1", "fc2"))
    lora = jlora.init(jax.random.key(0), params, config, dtype=jnp.float32)
    assert {x.dtype for x in jax.tree_util.tree_leaves(lora)} == {jnp.dtype(jnp.float32)}
    f = jlora.apply(model.apply, config)
    x = jnp.ones((4, 6), jnp.bfloat16)
    np.testing.assert_array_equal(f(params, lora, x), model.apply(params, x))
    grads = jax.grad(lambda l: jnp.sum(f(params, l, x).astype(jnp.float32) ** 2))(lora)
    assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads))
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(grads))
    merged = jlora.merge(params, randomize_lora(lora), config)
    assert merged["params"]["fc1"]["kernel"].dtype == jnp.bfloat16


def test_lora_dense_layer_matches_intercepted_dense():
    class Net(nn.Module):
        use_lora: bool

        @nn.compact
        def __call__(self, x):
            layer = jlora.LoraDense(5, r=2, lora_alpha=4.0, name="proj") if self.use_lora \
                else nn.Dense(5, name="proj")
            return layer(x)

    x = jax.random.normal(jax.random.key(0), (3, 4))
    variables = Net(True).init(jax.random.key(1), x)
    params, lora = jlora.partition(variables)
    assert set(lora["params"]["proj"]) == {"lora_a", "lora_b"}
    np.testing.assert_array_equal(Net(True).apply(variables, x), Net(False).apply(params, x))
    lora = randomize_lora(lora)
    config = jlora.LoraConfig(r=2, lora_alpha=4.0, target_modules=("proj",))
    via_layer = Net(True).apply(jlora.combine(params, lora), x)
    via_apply = jlora.apply(Net(False).apply, config)(params, lora, x)
    assert rel_err(via_layer, via_apply) <= 1e-6
    assert rel_err(via_layer, Net(False).apply(jlora.merge(params, lora, config), x)) <= 1e-5


def test_an_adapter_made_with_the_wrong_axis_roles_is_named():
    model = TinyLM()
    params = init_model(model, ((2, 5), jnp.int32))
    config = jlora.LoraConfig(r=2, target_modules=("out",))
    # "out" contracts (heads, head_dim) = (2, 4); made as if it contracted only heads, the adapter still fits the kernel
    wrong = {f"block_{i}/attn/out": jlora.KernelLayout(in_dims=1) for i in range(2)}
    lora = jlora.init(jax.random.key(0), params, config, layouts=wrong)
    with pytest.raises(ValueError, match=r"block_0/attn/out.*contracts inputs of shape \(2, 4\) but its lora_a is \(2, 2\)"):
        jlora.apply(model.apply, config)(params, lora, IDS)
