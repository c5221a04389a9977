"""Training wiring: only the trainable leaves move, the frozen base stays bit-identical."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from models import MLP, init_model

X = jax.random.normal(jax.random.key(0), (32, 6))
Y = jax.random.randint(jax.random.key(1), (32,), 0, 3)


def loss_of(f, frozen, trainable):
    logits = f(frozen, trainable, X)
    return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean()


def train(config, steps=5):
    model = MLP()
    params = init_model(model, ((2, 6), jnp.float32))
    lora = jlora.init(jax.random.key(2), params, config)
    trainable, frozen = jlora.split(params, lora, config)
    f = jlora.apply(model.apply, config)
    tx = jlora.optimizer(optax.adam(1e-2), config)
    opt_state = tx.init(trainable)

    @jax.jit
    def step(trainable, opt_state):
        loss, grads = jax.value_and_grad(lambda t: loss_of(f, frozen, t))(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    frozen_before = jax.tree_util.tree_map(np.array, frozen)
    start = trainable
    losses = []
    for _ in range(steps):
        trainable, opt_state, loss = step(trainable, opt_state)
        losses.append(float(loss))
    return params, frozen_before, frozen, start, trainable, losses


def flat(tree):
    """``{"params/fc1/lora_a": leaf, ...}``."""
    return {"/".join(str(p.key) for p in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_base_bit_identical_and_only_adapters_change():
    config = jlora.LoraConfig(r=2, target_modules=("fc1", "fc2"))
    params, frozen_before, frozen, start, trained, losses = train(config)
    assert losses[-1] < losses[0]
    jax.tree_util.tree_map(np.testing.assert_array_equal, frozen, frozen_before)
    assert set(flat(trained)) == {"params/fc1/lora_a", "params/fc1/lora_b", "params/fc2/lora_a", "params/fc2/lora_b"}
    for key, leaf in flat(trained).items():
        assert not np.array_equal(leaf, flat(start)[key]), key
    # the frozen tree is the whole base: no base leaf moved into the trainable tree
    assert set(flat(frozen)) == set(flat(params))


@pytest.mark.parametrize("bias,expected", [
    ("all", {"params/fc1/bias", "params/fc2/bias", "params/classifier/bias"}),
    ("lora_only", {"params/fc1/bias"}),
])
def test_bias_modes(bias, expected):
    config = jlora.LoraConfig(r=2, target_modules=("fc1",), bias=bias)
    params, frozen_before, frozen, start, trained, _ = train(config)
    biases = {k for k in flat(trained) if k.endswith("bias")}
    assert biases == expected
    for key in biases:
        assert not np.array_equal(flat(trained)[key], flat(start)[key])
    jax.tree_util.tree_map(np.testing.assert_array_equal, frozen, frozen_before)
    merged = jlora.merge(params, trained, config)
    for key in biases:
        np.testing.assert_array_equal(flat(merged)[key], flat(trained)[key])


def test_modules_to_save_train_in_full_and_merge_carries_them():
    config = jlora.LoraConfig(r=2, target_modules=("fc1",), modules_to_save=("classifier",))
    params, _, frozen, start, trained, _ = train(config)
    assert {"params/classifier/kernel", "params/classifier/bias"} <= set(flat(trained))
    assert "params/classifier/kernel" not in flat(frozen)
    assert not np.array_equal(flat(trained)["params/classifier/kernel"], flat(start)["params/classifier/kernel"])
    merged = jlora.merge(params, trained, config)
    np.testing.assert_array_equal(merged["params"]["classifier"]["kernel"], trained["params"]["classifier"]["kernel"])
    model = MLP()
    np.testing.assert_allclose(model.apply(merged, X), jlora.apply(model.apply, config)(frozen, trained, X),
                               rtol=1e-5, atol=1e-6)


def test_combined_tree_with_multi_transform_keeps_frozen_leaves_and_no_state_for_them():
    model = MLP()
    config = jlora.LoraConfig(r=2, target_modules=("fc2",))
    params = init_model(model, ((2, 6), jnp.float32))
    combined = jlora.combine(params, jlora.init(jax.random.key(0), params, config))
    tx = jlora.optimizer(optax.adam(1e-2), config)
    state = tx.init(combined)
    labels = jlora.labels(combined, config)
    assert labels["params"]["fc2"] == {"kernel": "frozen", "bias": "frozen", "lora_a": "trainable", "lora_b": "trainable"}
    moments = [x for x in jax.tree_util.tree_leaves(state) if getattr(x, "ndim", 0) == 2]
    assert sorted(m.shape for m in moments) == sorted([(16, 2), (2, 16)] * 2)  # Adam mu, nu for A and B only

    def loss(tree):
        p, l = jlora.partition(tree)
        return optax.softmax_cross_entropy_with_integer_labels(jlora.apply(model.apply, config)(p, l, X), Y).mean()

    for _ in range(3):
        updates, state = tx.update(jax.grad(loss)(combined), state, combined)
        combined = optax.apply_updates(combined, updates)
    base, lora = jlora.partition(combined)
    jax.tree_util.tree_map(np.testing.assert_array_equal, base, params)
    assert float(jnp.abs(lora["params"]["fc2"]["lora_b"]).max()) > 0


def test_count_reports_trainable_and_checkpoint_bytes():
    model = MLP()
    params = init_model(model, ((2, 6), jnp.float32))
    config = jlora.LoraConfig(r=2, target_modules=("fc1", "fc2"), bias="lora_only")
    lora = jlora.init(jax.random.key(0), params, config)
    counts = jlora.count(params, lora, config)
    base = 6 * 16 + 16 + 16 * 16 + 16 + 16 * 3 + 3
    adapter = (6 * 2 + 2 * 16) + (16 * 2 + 2 * 16)
    assert (counts.base, counts.adapter, counts.trainable) == (base, adapter, adapter + 32)
    assert counts.checkpoint_bytes == 4 * (adapter + 32) and counts.base_bytes == 4 * base
    assert "trainable params: 140" in str(counts)


def test_split_copies_trained_base_leaves_so_donation_keeps_params_alive():
    model = MLP()
    params = init_model(model, ((2, 6), jnp.float32))
    config = jlora.LoraConfig(r=2, target_modules=("fc1",), modules_to_save=("classifier",), bias="all")
    trainable, frozen = jlora.split(params, jlora.init(jax.random.key(0), params, config), config)
    jax.jit(lambda t: jax.tree_util.tree_map(lambda x: x + 1, t), donate_argnums=0)(trainable)
    np.testing.assert_array_equal(model.apply(params, X), model.apply(jlora.combine(frozen, {
        "params": {"classifier": params["params"]["classifier"], "fc1": {"bias": params["params"]["fc1"]["bias"]},
                   "fc2": {"bias": params["params"]["fc2"]["bias"]}}}), X))
