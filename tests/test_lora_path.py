"""The low-rank path of jlora.layers (scale applied to the rank-r hidden, issue 11) equals the
textbook ``scale * (x @ A) @ B`` in value and in every gradient, for plain, DenseGeneral-style and
fused (MergedLinear) layers; and the fused loss's block-wise logsumexp stays exact when the logits
are large."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import given, settings, strategies as st

from jlora.layers import attend_delta, dense_delta, embed_delta, fused_dense_delta
from jlora.losses import lm_head_cross_entropy


def _arrays(rng, *shapes):
    return [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]


def _check_value_and_grads(fn, reference, args, rtol=2e-5):
    """Values and vjps agree. The absolute tolerance scales with each array's largest entry: the two
    orders of the float32 sums differ by a few ulps of the largest terms, which a small entry of the
    same array (e.g. 0.62 among entries of ~140) cannot meet by rtol alone."""
    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=jax.eval_shape(fn, *args).shape), jnp.float32)
    value, vjp = jax.vjp(fn, *args)
    want, want_vjp = jax.vjp(reference, *args)
    for got, expected in zip((value, *vjp(cotangent)), (want, *want_vjp(cotangent))):
        expected = np.asarray(expected)
        atol = 1e-5 * max(1.0, float(np.abs(expected).max(initial=0.0)))
        np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol)


@settings(max_examples=30, deadline=None)
@given(tokens=st.integers(1, 12), fan_in=st.integers(1, 24), fan_out=st.integers(1, 24), r=st.integers(1, 6),
       scale=st.floats(0.05, 8.0), seed=st.integers(0, 2**16))
def test_dense_delta_equals_scale_times_xab_with_its_gradients(tokens, fan_in, fan_out, r, scale, seed):
    x, a, b = _arrays(np.random.default_rng(seed), (2, tokens, fan_in), (fan_in, r), (r, fan_out))
    _check_value_and_grads(lambda x, a, b: dense_delta(x, a, b, scale),
                           lambda x, a, b: scale * ((x @ a) @ b), (x, a, b))


@settings(max_examples=15, deadline=None)
@given(heads=st.integers(1, 4), dim=st.integers(1, 6), r=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_dense_general_delta_over_two_input_axes(heads, dim, r, seed):
    x, a, b = _arrays(np.random.default_rng(seed), (3, 5, heads, dim), (heads, dim, r), (r, 7))
    _check_value_and_grads(lambda x, a, b: dense_delta(x, a, b, 0.5, axis=(-2, -1)),
                           lambda x, a, b: 0.5 * jnp.einsum("tshd,hdr,ro->tso", x, a, b), (x, a, b))


@settings(max_examples=15, deadline=None)
@given(mask=st.lists(st.booleans(), min_size=1, max_size=4).filter(any), width=st.integers(1, 6),
       seed=st.integers(0, 2**16))
def test_fused_delta_fills_enabled_slices_only(mask, width, seed):
    enabled = sum(mask)
    x, a, b = _arrays(np.random.default_rng(seed), (4, 9), (enabled, 9, 3), (enabled, 3, width))

    def reference(x, a, b):
        parts = iter(range(enabled))
        return jnp.concatenate([2.0 * (x @ a[i]) @ b[i] if on else jnp.zeros((4, width))
                                for on, i in ((on, next(parts) if on else None) for on in mask)], axis=-1)
    _check_value_and_grads(lambda x, a, b: fused_dense_delta(x, a, b, 2.0, mask), reference, (x, a, b))


def test_embedding_lookup_and_attend_deltas():
    rng = np.random.default_rng(0)
    a, b, query = _arrays(rng, (11, 3), (3, 6), (4, 6))
    ids = jnp.array([[0, 5, 10], [3, 3, 1]])
    np.testing.assert_allclose(embed_delta(ids, a, b, 1.5), 1.5 * (a @ b)[ids], rtol=1e-5)
    _check_value_and_grads(lambda q, a, b: attend_delta(q, a, b, 1.5), lambda q, a, b: 1.5 * q @ (a @ b).T,
                           (query, a, b))


def test_fused_loss_is_exact_for_large_logits_across_blocks():
    """Block-wise logsumexp with maxima that differ by hundreds between blocks: no overflow, no loss of the
    small blocks, the same value and gradients as optax on the full logits."""
    rng = np.random.default_rng(0)
    hidden, kernel = _arrays(rng, (6, 8), (8, 37))
    kernel = kernel.at[:, 30:].multiply(80.0)  # the tail block dominates
    labels = jnp.array([0, 5, 12, 31, 36, 20])

    def reference(h, k):
        return optax.softmax_cross_entropy_with_integer_labels(h @ k, labels).mean()
    for chunk in (4, 10, 37, 64):
        loss = lambda h, k: lm_head_cross_entropy(h, k, labels, chunk_size=chunk)  # noqa: E731
        value, grads = jax.value_and_grad(loss, (0, 1))(hidden, kernel)
        want, want_grads = jax.value_and_grad(reference, (0, 1))(hidden, kernel)
        assert np.isfinite(value)
        np.testing.assert_allclose(value, want, rtol=1e-5)
        for got, expected in zip(grads, want_grads):
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_jlora_rng_keys_draw_the_bits_of_jax_default_keys():
    """jlora.rng.key (threefry with its rounds unrolled) gives jax.random.key's bits for every sampler."""
    from jlora import rng
    for seed in (0, 1, 2**31 + 5):
        ours, theirs = rng.key(seed), jax.random.key(seed)
        for shape in ((), (7,), (3, 5, 11), (16, 128, 6)):
            np.testing.assert_array_equal(jax.random.bits(ours, shape), jax.random.bits(theirs, shape))
            np.testing.assert_array_equal(jax.random.bits(ours, shape, jnp.uint8), jax.random.bits(theirs, shape, jnp.uint8))
            np.testing.assert_array_equal(jax.random.bernoulli(ours, 0.9, shape), jax.random.bernoulli(theirs, 0.9, shape))
        np.testing.assert_array_equal(jax.random.normal(jax.random.fold_in(ours, 3), (4, 4)),
                                      jax.random.normal(jax.random.fold_in(theirs, 3), (4, 4)))
        ours_split, theirs_split = jax.random.split(ours), jax.random.split(theirs)
        np.testing.assert_array_equal(jax.random.key_data(ours_split), jax.random.key_data(theirs_split))
        np.testing.assert_array_equal(jax.jit(lambda k: jax.random.uniform(k, (33, 9)))(ours_split[1]),
                                      jax.random.uniform(theirs_split[1], (33, 9)))


def test_flax_dropout_with_a_jlora_rng_key_equals_the_default_key():
    import flax.linen as nn
    x = jnp.ones((4, 32))
    layer = nn.Dropout(0.3, deterministic=False)
    from jlora import rng
    np.testing.assert_array_equal(layer.apply({}, x, rngs={"dropout": rng.key(7)}),
                                  layer.apply({}, x, rngs={"dropout": jax.random.key(7)}))
