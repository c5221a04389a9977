"""FlaxT5 on every tested jax (jlora.hf.t5): transformers 4.57's T5 calls jnp.clip(a_max=), gone in jax 0.10.

No torch needed: this runs in the newest tested set too, where test_hf_models.py is skipped.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.hf import t5

tf = pytest.importorskip("transformers")


def test_clip_takes_both_spellings():
    x = jnp.arange(-3, 4)
    np.testing.assert_array_equal(t5.clip(x, a_max=0), jnp.minimum(x, 0))
    np.testing.assert_array_equal(t5.clip(x, a_min=-1, a_max=2), jnp.clip(x, min=-1, max=2))
    np.testing.assert_array_equal(t5.clip(x, min=1), jnp.maximum(x, 1))
    np.testing.assert_array_equal(t5.clip(a=x, a_min=0), jnp.maximum(x, 0))
    with pytest.raises(TypeError, match="a_max"):
        t5.clip(x, max=1, a_max=2)
    assert t5.NUMPY.float32 is jnp.float32 and t5.NUMPY.clip is t5.clip


def test_patch_touches_only_a_module_that_uses_jax_numpy():
    import types
    mod, other = types.ModuleType("m"), types.ModuleType("o")
    mod.jnp, other.jnp = jnp, np
    t5.patch(mod)
    t5.patch(other)
    assert mod.jnp is t5.NUMPY and other.jnp is np


def test_flax_t5_builds_and_trains_with_lora():
    from transformers.models.t5 import modeling_flax_t5

    assert (modeling_flax_t5.jnp is t5.NUMPY) == t5.needed(), "jlora.hf.t5.install() did not patch FlaxT5"
    config = tf.T5Config(num_layers=2, d_model=32, d_kv=8, num_heads=4, d_ff=64, vocab_size=96)
    model = tf.FlaxT5ForConditionalGeneration(config, seed=0)
    lora_config = jlora.hf.default_config(model, r=4)
    lora = jlora.init(jax.random.key(0), model.params, lora_config)
    f = jlora.apply(model, lora_config)
    ids = np.arange(3, 15, dtype=np.int32).reshape(2, 6)
    inputs = dict(input_ids=ids, decoder_input_ids=ids[:, ::-1].copy())
    np.testing.assert_allclose(f(model.params, lora, **inputs).logits, model(**inputs).logits, atol=1e-5)

    def loss(lora):
        return jnp.mean(f(model.params, lora, **inputs).logits ** 2)

    grads = jax.jit(jax.grad(loss))(lora)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
