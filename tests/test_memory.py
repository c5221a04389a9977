"""No materialisation: XLA's compiled memory of a LoRA train step on a 4096x4096 kernel.

``compiled.memory_analysis()`` reports the buffers XLA allocates for the step's outputs and
temporaries. A LoRA step that formed ``W + BA`` or a (4096, 4096) gradient would need at least one
kernel-sized buffer (64 MiB); the full fine-tune step of the same model, compiled the same way, is
the control that shows such a buffer is counted.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jlora

D = 4096
KERNEL_BYTES = D * D * 4


class BigKernel(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(8, name="head")(jnp.tanh(nn.Dense(D, name="big")(x)))


def compiled_bytes(step, *args):
    stats = jax.jit(step).lower(*args).compile().memory_analysis()
    return stats.output_size_in_bytes + stats.temp_size_in_bytes - stats.alias_size_in_bytes


def test_lora_step_allocates_less_than_one_kernel_gradient():
    model = BigKernel()
    x = jax.ShapeDtypeStruct((8, D), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    config = jlora.LoraConfig(r=8, target_modules=("big",))
    lora = jax.eval_shape(lambda p: jlora.init(jax.random.key(1), p, config), params)
    trainable, frozen = jax.eval_shape(lambda p, l: jlora.split(p, l, config), params, lora)
    f = jlora.apply(model.apply, config)
    tx = jlora.optimizer(optax.adam(1e-3), config)
    full_tx = optax.adam(1e-3)

    def lora_step(trainable, opt_state, frozen, x):
        grads = jax.grad(lambda t: jnp.mean(f(frozen, t, x) ** 2))(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    def full_step(params, opt_state, x):
        grads = jax.grad(lambda p: jnp.mean(model.apply(p, x) ** 2))(params)
        updates, opt_state = full_tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    lora_bytes = compiled_bytes(lora_step, trainable, jax.eval_shape(tx.init, trainable), frozen, x)
    full_bytes = compiled_bytes(full_step, params, jax.eval_shape(full_tx.init, params), x)
    print(f"compiled output+temp bytes: LoRA {lora_bytes / 2**20:.2f} MiB, full {full_bytes / 2**20:.2f} MiB, "
          f"one kernel {KERNEL_BYTES / 2**20:.0f} MiB")
    assert full_bytes >= 3 * KERNEL_BYTES  # control: new kernel + grad-sized Adam moments are counted
    assert lora_bytes < KERNEL_BYTES / 16
