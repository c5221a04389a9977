"""A small deterministic LoRA training problem shared by the subprocess workers."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jlora

CONFIG = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=("fc1", "fc2"), modules_to_save=("head",))
GLOBAL_BATCH = 16


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(64, name="fc1")(x))
        x = nn.gelu(nn.Dense(64, name="fc2")(x))
        return nn.Dense(8, name="head")(x)


def setup():
    """``(params, trainable, frozen, loss_fn, tx)``; everything from fixed seeds."""
    model = Net()
    params = model.init(jax.random.key(0), jnp.zeros((1, 16)))
    lora = jlora.init(jax.random.key(1), params, CONFIG)
    trainable, frozen = jlora.split(params, lora, CONFIG)
    f = jlora.apply(model.apply, CONFIG)

    def loss_fn(t, fz, batch):
        return optax.softmax_cross_entropy_with_integer_labels(f(fz, t, batch["x"]), batch["y"]).mean()

    return params, trainable, frozen, loss_fn, jlora.optimizer(optax.adamw(3e-2), CONFIG)


def batch_for(step: int) -> dict[str, jax.Array]:
    """The global batch of ``step`` (a function of the step only, so resumes see the same data)."""
    key = jax.random.fold_in(jax.random.key(2), step)
    x = jax.random.normal(key, (GLOBAL_BATCH, 16))
    return {"x": x, "y": (jnp.argmax(x[:, :8], axis=-1) + step) % 8}
