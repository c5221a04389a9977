"""jlora.losses: the fused output-projection cross-entropy equals optax's on the full logits (value and
gradients, any chunking), never holds a second logits-sized buffer, and names bad input."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from jlora.losses import lm_head_cross_entropy, next_token_targets


def reference(hidden, kernel, labels, weights, transposed):
    logits = jnp.einsum("...d,vd->...v" if transposed else "...d,dv->...v", hidden, kernel)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(nll * weights) / jnp.sum(weights)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), seq=st.integers(1, 9), d=st.integers(1, 8), vocab=st.integers(2, 40),
       chunk=st.integers(1, 16), transposed=st.booleans(), seed=st.integers(0, 2**16))
def test_value_and_gradients_equal_optax_on_the_full_logits(batch, seq, d, vocab, chunk, transposed, seed):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(batch, seq, d)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(vocab, d) if transposed else (d, vocab)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, vocab, (batch, seq)), jnp.int32)
    weights = jnp.asarray(rng.random((batch, seq)) < 0.7, jnp.float32).at[0, 0].set(1.0)

    fused = lambda h, k: lm_head_cross_entropy(h, k, labels, weights, transposed=transposed,  # noqa: E731
                                               chunk_size=chunk)
    value, (dh, dk) = jax.value_and_grad(fused, (0, 1))(hidden, kernel)
    want, (want_dh, want_dk) = jax.value_and_grad(reference, (0, 1))(hidden, kernel, labels, weights, transposed)
    np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dh, want_dh, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(dk, want_dk, rtol=1e-4, atol=1e-6)


def test_next_token_targets_shift_and_mask_the_last_position():
    ids = jnp.array([[5, 6, 7], [1, 2, 3]])
    labels, weights = next_token_targets(ids)
    np.testing.assert_array_equal(labels, [[6, 7, 0], [2, 3, 0]])
    np.testing.assert_array_equal(weights, [[1, 1, 0], [1, 1, 0]])
    hidden = jax.random.normal(jax.random.key(0), (2, 3, 4))
    kernel = jax.random.normal(jax.random.key(1), (4, 9))
    logits = hidden @ kernel
    plain = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()
    np.testing.assert_allclose(lm_head_cross_entropy(hidden, kernel, labels, weights), plain, rtol=1e-6)


def test_bfloat16_inputs_give_a_float32_loss_close_to_the_float32_one():
    hidden = jax.random.normal(jax.random.key(0), (4, 16, 32))
    kernel = jax.random.normal(jax.random.key(1), (32, 100)) * 0.1
    labels = jax.random.randint(jax.random.key(2), (4, 16), 0, 100)
    loss32 = lm_head_cross_entropy(hidden, kernel, labels)
    loss16, grads = jax.value_and_grad(lm_head_cross_entropy, (0, 1))(
        hidden.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), labels)
    assert loss16.dtype == jnp.float32 and grads[0].dtype == grads[1].dtype == jnp.bfloat16
    np.testing.assert_allclose(loss16, loss32, rtol=2e-2)


def test_the_gradient_holds_one_logits_tensor_and_a_frozen_kernel_gets_no_gradient_matmul():
    """LoRA's case: the kernel is not differentiated. The compiled gradient must not hold the logits
    gradient in full (it is formed chunk by chunk) nor a second copy of the logits, and XLA must drop
    the kernel-gradient matmul (it does when the kernel is differentiated: the control)."""
    tokens, d, vocab, chunk = 512, 16, 4096, 32
    hidden = jax.random.normal(jax.random.key(0), (tokens, d))
    kernel = jax.random.normal(jax.random.key(1), (d, vocab))
    labels = jax.random.randint(jax.random.key(2), (tokens,), 0, vocab)
    logits_bytes = tokens * vocab * 4

    def temp_bytes(loss):
        grad = jax.jit(jax.grad(lambda h, k: loss(h, k)))  # w.r.t. hidden only: the kernel is frozen
        return grad.lower(hidden, kernel).compile().memory_analysis().temp_size_in_bytes

    fused = temp_bytes(lambda h, k: lm_head_cross_entropy(h, k, labels, chunk_size=chunk))
    plain = temp_bytes(lambda h, k: optax.softmax_cross_entropy_with_integer_labels(h @ k, labels).mean())
    assert fused < 1.25 * logits_bytes, (fused, logits_bytes)
    assert plain > 1.9 * logits_bytes, (plain, logits_bytes)  # the control: the unfused recipe holds two

    def kernel_gradient_dots(argnums):
        loss = lambda h, k: lm_head_cross_entropy(h, k, labels, chunk_size=chunk)  # noqa: E731
        hlo = jax.jit(jax.grad(loss, argnums)).lower(hidden, kernel).compile().as_text()
        # dW is formed block by block: (d, chunk) products of h^T and a block of the logits gradient
        return [line for line in hlo.splitlines() if re.search(rf"f32\[{d},{chunk}\]\{{[0-9,]*\}} dot\(", line)]
    assert kernel_gradient_dots(0) == []
    assert len(kernel_gradient_dots((0, 1))) == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(kernel=jnp.zeros((5, 7))), r"kernel: expected shape \(d, V\) with d=4"),
    (dict(kernel=jnp.zeros((4, 7)), transposed=True), r"kernel: expected shape \(V, d\) with d=4"),
    (dict(labels=jnp.zeros((2, 4), jnp.int32)), r"labels: expected shape \(2, 3\)"),
    (dict(labels=jnp.zeros((2, 3))), "labels: expected an integer dtype"),
    (dict(weights=jnp.ones((3, 2))), r"weights: expected shape \(2, 3\)"),
    (dict(chunk_size=0), "chunk_size: expected a positive int"),
])
def test_bad_input_names_the_argument(kwargs, message):
    args = dict(hidden=jnp.zeros((2, 3, 4)), kernel=jnp.zeros((4, 7)), labels=jnp.zeros((2, 3), jnp.int32))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        lm_head_cross_entropy(**args)
    with pytest.raises(ValueError, match="ids: expected shape"):
        next_token_targets(jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match=r"token_weights: expected the shape of ids \(2, 3\)"):
        next_token_targets(jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r"segment_ids: expected the shape of ids \(2, 3\)"):
        next_token_targets(jnp.zeros((2, 3), jnp.int32), segment_ids=jnp.ones((3,), jnp.int32))
