"""Sharded training on 8 fake CPU devices: adapter specs derived from the base, same numbers as 1 device."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, PartitionSpec as P

import jlora
from jlora.sharding import derive_specs
from jlora.train import make_pmap_train_step, make_train_step, plan_shardings
from models import MLP, init_model

CONFIG = jlora.LoraConfig(r=2, target_modules=("fc1", "fc2"), modules_to_save=("classifier",))
MODEL = MLP(hidden=32, classes=8)


def setup():
    params = init_model(MODEL, ((2, 8), jnp.float32))
    lora = jax.tree_util.tree_map(lambda x: x + 0.1, jlora.init(jax.random.key(0), params, CONFIG))
    trainable, frozen = jlora.split(params, lora, CONFIG)
    f = jlora.apply(MODEL.apply, CONFIG)

    def loss_fn(t, fz, batch):
        return optax.softmax_cross_entropy_with_integer_labels(f(fz, t, batch["x"]), batch["y"]).mean()
    tx = jlora.optimizer(optax.adam(1e-2), CONFIG)
    return params, trainable, frozen, loss_fn, tx


def batches(steps=3):
    for i in range(steps):
        yield {"x": jax.random.normal(jax.random.key(10 + i), (16, 8)),
               "y": jax.random.randint(jax.random.key(20 + i), (16,), 0, 8)}


def run(step, trainable, opt_state, frozen, put=lambda batch: batch):
    losses = []
    for batch in batches():
        trainable, opt_state, loss = step(trainable, opt_state, frozen, put(batch))
        losses.append(float(loss))
    return losses, jax.device_get(trainable)


def reference():
    params, trainable, frozen, loss_fn, tx = setup()
    return run(make_train_step(loss_fn, tx, donate=False), trainable, tx.init(trainable), frozen)


LAYOUTS = {
    "data-parallel (8,)": ((8,), ("data",), {}),
    "data x model (2, 4)": ((2, 4), ("data", "model"), {"fc1": {"kernel": P(None, "model"), "bias": P("model")},
                                                        "fc2": {"kernel": P("model", None)}}),
    "fsdp (8,)": ((8,), ("data",), {"fc1": {"kernel": P(None, "data")}, "fc2": {"kernel": P("data", None)},
                                    "classifier": {"kernel": P("data", None)}}),
}


# Explicit axes: only data parallelism, since flax's own nn.Dense (the base layer, not jlora) does not
# pass out_sharding to dot_general, which explicit mode requires for a sharded contraction.
@pytest.mark.parametrize("layout,explicit", [(name, False) for name in sorted(LAYOUTS)] +
                         [("data-parallel (8,)", True)])
def test_sharded_training_matches_one_device(layout, explicit):
    shape, axes, specs = LAYOUTS[layout]
    kind = AxisType.Explicit if explicit else AxisType.Auto
    mesh = jax.make_mesh(shape, axes, axis_types=(kind,) * len(axes))
    params, trainable, frozen, loss_fn, tx = setup()
    param_specs = {"params": specs}
    shardings = plan_shardings(mesh, params, param_specs, trainable, frozen, tx, CONFIG, batch_spec=P("data"))
    with jax.set_mesh(mesh):
        placed = shardings.place(trainable, tx.init(trainable), frozen)
        losses, trained = run(make_train_step(loss_fn, tx, shardings), *placed,
                              put=lambda batch: jax.device_put(batch, shardings.batch))
    ref_losses, ref_trained = reference()
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(trained), jax.tree_util.tree_leaves(ref_trained)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_adapter_specs_follow_the_kernel():
    params, trainable, frozen, loss_fn, tx = setup()
    specs = derive_specs(params, {"params": LAYOUTS["data x model (2, 4)"][2]}, trainable, CONFIG)["params"]
    assert specs["fc1"]["lora_a"] == P(None, None) and specs["fc1"]["lora_b"] == P(None, "model")
    assert specs["fc2"]["lora_a"] == P("model", None) and specs["fc2"]["lora_b"] == P(None, None)
    assert specs["classifier"]["kernel"] == P(None, None)
    # stacked DenseGeneral kernel (layers, d, heads, head_dim) sharded over heads
    stacked = target((4, 64, 8, 16), jlora.KernelLayout(stack_dims=1, in_dims=1), rank=2)
    assert stacked.lora_shapes == ((4, 64, 2), (4, 2, 8, 16))
    a, b = stacked.specs(P(None, "data", "model"))
    assert a == P(None, "data", None) and b == P(None, None, "model", None)
    # GPT-2 Conv1D kernel stored (out, in) with fused q,v slices; out=96 slices of 32
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    fused = target((96, 32), jlora.KernelLayout(transposed=True), rank=4, slices=(True, False, True))
    assert fused.lora_shapes == ((2, 32, 4), (2, 4, 32))
    a, b = fused.specs(P("model", "data"), mesh)
    assert a == P(None, "data", None) and b == P(None, None, "model")
    narrow = target((18, 32), jlora.KernelLayout(transposed=True), rank=4, slices=(True, False, True))
    a, b = narrow.specs(P("model", None), mesh)
    assert b == P(None, None, None)  # a slice of 6 is not divisible by the 4-way model axis: replicated


def target(shape, layout, rank, slices=None):
    return jlora.Target(path="m", key_path=("m", "kernel"), kind="dense", layer="test", shape=shape,
                        dtype="float32", layout=layout, rank=rank, alpha=1.0, scale=1.0, slices=slices)


def test_pmap_step_matches_one_device():
    params, trainable, frozen, loss_fn, tx = setup()
    step = make_pmap_train_step(loss_fn, tx)
    opt_state, losses = tx.init(trainable), []
    for batch in batches():
        sharded = jax.tree_util.tree_map(lambda x: x.reshape(8, -1, *x.shape[1:]), batch)
        trainable, opt_state, loss = step(trainable, opt_state, frozen, sharded)
        losses.append(float(loss))
    ref_losses, ref_trained = reference()
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(trainable), jax.tree_util.tree_leaves(ref_trained)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
