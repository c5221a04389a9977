"""QLoRA: quantized frozen bases (int8, NF4) under jlora.apply, merge, grad, scan, remat, sharding,
checkpoints; error bounds of the formats; one layer's kernel live at a time (XLA's compiled memory)."""
import flax.linen as nn
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from transformers import LlamaConfig

import jlora
from jlora.checkpoint import base_fingerprint
from jlora.hf.llama import FlaxLlamaForCausalLMFixed
from jlora.qformats import NF4_BLOCK, NF4_LEVELS, NF4Kernel, quantize_kernel
from jlora.train import make_pmap_train_step, make_train_step, plan_shardings
from hf_cases import CASES

FORMATS = ("nf4", "int8")
# the widest gap between neighbouring NF4 levels, halved: the rounding error of a normalised value
NF4_HALF_GAP = float(np.max(np.diff(NF4_LEVELS)) / 2)


@settings(max_examples=25, deadline=None)
@given(blocks=st.integers(1, 3), cols=st.integers(1, 5), log_scale=st.floats(-6, 3),
       seed=st.integers(0, 2**31 - 1), stacked=st.booleans())
def test_nf4_error_is_within_half_a_level_of_each_block_absmax(blocks, cols, log_scale, seed, stacked):
    shape = ((2,) if stacked else ()) + (blocks * NF4_BLOCK, cols * 3)
    w = np.random.default_rng(seed).standard_t(3, size=shape).astype(np.float32) * np.float32(10.0 ** log_scale)
    q = quantize_kernel(w, "nf4")
    assert isinstance(q, NF4Kernel) and q.shape == w.shape and q.codes.dtype == jnp.uint8
    got = np.asarray(q.dequantize())
    absmax = np.abs(w.reshape(*shape[:-2], blocks, NF4_BLOCK, shape[-1])).max(axis=-2, keepdims=True)
    stored = np.asarray(q.block_scales())[..., :, None, :]  # the double-quantized absmax
    bound = NF4_HALF_GAP * stored + np.abs(stored - absmax) + 1e-6 * absmax
    err = np.abs(got - w).reshape(absmax.shape[:-2] + (NF4_BLOCK, shape[-1]))
    assert (err <= bound).all()
    # the scales themselves: uint8 codes of log2 over their second-level block (here: a whole row of
    # block scales along the output axis), within half a step (in log2) of each scale, relatively
    logs = np.log2(np.maximum(absmax, 1e-30))
    step = (logs.max(axis=-1, keepdims=True) - logs.min(axis=-1, keepdims=True)) / 255
    assert (np.abs(stored - absmax) <= absmax * (2.0 ** (step / 2) - 1) * 1.001 + 1e-6 * absmax).all()


@settings(max_examples=25, deadline=None)
@given(w=hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=16),
                    elements=st.floats(-1e4, 1e4, width=32)))
def test_int8_error_is_within_half_a_step_of_each_channel(w):
    q = quantize_kernel(w, "int8")
    assert q.codes.dtype == jnp.int8 and q.shape == w.shape
    step = np.abs(w).max(axis=-2, keepdims=True) / 127
    assert (np.abs(np.asarray(q.dequantize()) - w) <= step / 2 * 1.0001 + 1e-30).all()


def test_an_outlier_channel_does_not_coarsen_its_neighbours_scales():
    w = np.random.default_rng(0).standard_normal((256, 512)).astype(np.float32)
    spiked = w.copy()
    spiked[:, 7] *= 100  # one channel 100x: its scales share second-level blocks with 255 others
    others = np.arange(512) != 7
    errors = [np.linalg.norm((np.asarray(quantize_kernel(x, "nf4").dequantize()) - x)[:, others]) /
              np.linalg.norm(x[:, others]) for x in (w, spiked)]
    assert errors[1] < errors[0] * 1.01, errors


def test_bytes_per_weight():
    w = jnp.ones((1024, 512), jnp.bfloat16)
    assert quantize_kernel(w, "nf4").nbytes / w.nbytes <= 0.27  # codes 0.5 B + scales, vs bf16's 2 B
    assert quantize_kernel(w, "int8").nbytes / w.nbytes <= 0.51


class Block(nn.Module):
    """Dense layers of every kind jlora computes quantized: Dense, DenseGeneral in and out of heads."""

    @nn.compact
    def __call__(self, x):
        h = nn.DenseGeneral((2, 64), name="query")(x)  # kernel (64, 2, 64)
        x = x + nn.DenseGeneral(64, axis=(-2, -1), name="out")(jax.nn.gelu(h))  # kernel (2, 64, 64)
        return x + nn.Dense(64, name="mlp")(jax.nn.gelu(nn.Dense(128, name="up")(x)))


class ScanStep(nn.Module):
    @nn.compact
    def __call__(self, carry, _):
        return Block(name="block")(carry), None


class Net(nn.Module):
    scan: bool = False

    @nn.compact
    def __call__(self, x):
        if self.scan:
            stack = nn.scan(nn.remat(ScanStep), variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
            x, _ = stack(name="layers")(x, None)
        else:
            for i in range(3):
                x = Block(name=str(i))(x)
        return nn.Dense(10, name="head")(x)


CONFIG = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=("query", "up"), init_lora_weights=False)
X = jax.random.normal(jax.random.key(1), (8, 64))


@pytest.fixture(scope="module", params=[False, True], ids=["layers", "scan+remat"])
def net(request):
    model = Net(scan=request.param)
    params = model.init(jax.random.key(0), X)
    return model, params


@pytest.mark.parametrize("fmt", FORMATS)
def test_apply_grad_merge_over_a_quantized_base_equal_those_over_its_dequantization(net, fmt):
    model, params = net
    q = jlora.quantize(params, fmt, include=["query", "out", "mlp", "up"], model=model.apply, inputs=(X,))
    kinds = {type(leaf).__name__ for leaf in jax.tree_util.tree_leaves(q, is_leaf=jlora.is_quantized)}
    assert kinds >= {"NF4Kernel" if fmt == "nf4" else "Int8Kernel"}
    assert not jlora.is_quantized(q["params"]["head"]["kernel"])  # not selected: kept as it was
    deq = jlora.dequantize(q)
    f = jlora.apply(model.apply, CONFIG)
    lora = f.init(jax.random.key(2), q, X)
    want = f(deq, lora, X)  # the same math, one layer at a time: equal within float32 rounding
    np.testing.assert_allclose(f(q, lora, X), want, rtol=1e-5, atol=1e-6 * float(np.abs(want).max()))
    loss = lambda lo, p: jnp.mean(f(p, lo, X) ** 2)  # noqa: E731
    got = jax.jit(jax.grad(loss))(lora, q)
    want = jax.jit(jax.grad(loss))(lora, deq)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(np.abs(w).max()))  # XLA's fusions differ
    # gradients reach the adapters only: w.r.t. the quantized base they are zero
    base_grads = jax.grad(lambda p: loss(lora, p), allow_int=True)(q)
    for leaf in jax.tree_util.tree_leaves(base_grads, is_leaf=jlora.is_quantized):
        if jlora.is_quantized(leaf):
            assert all(not np.any(np.asarray(a, np.float32)) for a in jax.tree_util.tree_leaves(leaf)
                       if a.dtype != jax.dtypes.float0)
    merged = jlora.merge(q, lora, CONFIG, model=model.apply, inputs=(X,))
    assert not any(jlora.is_quantized(x) for x in jax.tree_util.tree_leaves(merged, is_leaf=jlora.is_quantized))
    np.testing.assert_allclose(model.apply(merged, X), f(q, lora, X), rtol=1e-5, atol=1e-5)


def _llama(layers, hidden=128):
    config = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    return FlaxLlamaForCausalLMFixed(config, seed=0)


def _compiled_temp(model, params, config, ids):
    f = jlora.apply(model, config)
    lora = jlora.init(jax.random.key(0), params, config)
    loss = lambda lo, p: f(p, lo, ids).logits.astype(jnp.float32).mean()  # noqa: E731
    return jax.jit(jax.grad(loss)).lower(lora, params).compile().memory_analysis().temp_size_in_bytes


def test_only_about_one_layer_of_full_precision_kernels_is_live_in_a_train_step():
    """XLA's compiled temp memory of the QLoRA step exceeds the LoRA step's by less than one layer's
    float kernels; were each layer's dequantized kernels kept for the backward pass (as a plain
    dequantize-then-matmul does), the excess would grow with the layers."""
    config = jlora.LoraConfig(r=8, lora_alpha=16, target_modules=("q_proj", "v_proj"))
    ids = jnp.zeros((2, 64), jnp.int32)
    excess = []
    for layers in (2, 6):
        model = _llama(layers, hidden=256)
        one_layer = sum(x.nbytes for x in jax.tree_util.tree_leaves(model.params["model"]["layers"]["0"]))
        excess.append(_compiled_temp(model, jlora.quantize(model.params, "nf4"), config, ids)
                      - _compiled_temp(model, model.params, config, ids))
        assert excess[-1] < one_layer, (layers, excess[-1], one_layer)
    assert excess[1] - excess[0] < one_layer / 4  # it does not grow with the layers


def test_hf_llama_quantized_base_with_a_tied_loss_and_generation():
    model = _llama(2)
    q = jlora.quantize(model.params, "nf4", lm_head=True)
    assert jlora.is_quantized(q["lm_head"]["kernel"]) and not jlora.is_quantized(q["model"]["embed_tokens"]["embedding"])
    assert jlora.base_bytes(q) < 0.4 * jlora.base_bytes(model.params)
    ids = jnp.arange(24, dtype=jnp.int32).reshape(2, 12) + 3
    f = jlora.apply(model, CONFIG_LLAMA)
    lora = jlora.init(jax.random.key(3), q, CONFIG_LLAMA)
    merged = jlora.merge(q, lora, CONFIG_LLAMA)
    np.testing.assert_allclose(f(q, lora, ids).logits, model(ids, params=merged).logits, atol=2e-5)
    with jlora.quantized_layers():  # the base alone, called directly
        np.testing.assert_array_equal(model(ids, params=q).logits, model(ids, params=jlora.dequantize(q)).logits)
    unmerged = jlora.generate(model, q, ids[:1], max_new_tokens=5, lora=lora, config=CONFIG_LLAMA)
    folded = jlora.generate(model, merged, ids[:1], max_new_tokens=5)
    np.testing.assert_array_equal(np.asarray(unmerged), np.asarray(folded))


CONFIG_LLAMA = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"), init_lora_weights=False)


def _train(step, trainable, opt_state, frozen, batches, put=lambda b: b):
    losses = []
    for batch in batches:
        trainable, opt_state, loss = step(trainable, opt_state, frozen, put(batch))
        losses.append(float(loss))
    return losses


def test_sharded_and_pmapped_qlora_steps_give_the_losses_of_one_device():
    model = _llama(2)
    q = jlora.quantize(model.params, "int8")
    f = jlora.apply(model, CONFIG_LLAMA)
    lora = jlora.init(jax.random.key(0), q, CONFIG_LLAMA)
    trainable, frozen = jlora.split(q, lora, CONFIG_LLAMA)
    tx = jlora.optimizer(optax.adam(1e-2), CONFIG_LLAMA)

    def loss_fn(t, fz, batch):
        logits = f(fz, t, batch).logits[:, :-1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
    batches = [jax.random.randint(jax.random.key(i), (8, 16), 0, 512) for i in range(3)]
    want = _train(make_train_step(loss_fn, tx, donate=False), trainable, tx.init(trainable), frozen, batches)

    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    specs = jax.tree_util.tree_map(lambda x: P(None, "fsdp") if x.ndim == 2 else P(), jlora.dequantize(q))
    shardings = plan_shardings(mesh, q, specs, trainable, frozen, tx, CONFIG_LLAMA, batch_spec=P(("data", "fsdp")))
    codes = shardings.frozen["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert codes.codes.spec == P(None, "fsdp") and codes.scale.spec == P(None, "fsdp")
    placed = jax.device_put(frozen, shardings.frozen)
    got = _train(make_train_step(loss_fn, tx, shardings, donate=False), jax.device_put(trainable, shardings.trainable),
                 jax.device_put(tx.init(trainable), shardings.opt_state), placed, batches,
                 lambda b: jax.device_put(b, NamedSharding(mesh, P(("data", "fsdp")))))
    np.testing.assert_allclose(got, want, rtol=2e-5)

    n = jax.local_device_count()
    pmapped = make_pmap_train_step(loss_fn, tx)
    got = _train(pmapped, trainable, tx.init(trainable), frozen, [b.reshape(n, 8 // n, 16) for b in batches])
    np.testing.assert_allclose(got, want, rtol=2e-5)


def test_quantized_base_saves_with_orbax_and_is_fingerprinted(tmp_path):
    model = _llama(1)
    q = jlora.quantize(model.params, "nf4")
    path = tmp_path / "base"
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, q)
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(path, jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, q))
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(q)):
        np.testing.assert_array_equal(a, b)
    assert type(restored["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"]) is NF4Kernel
    fingerprints = {base_fingerprint(q), base_fingerprint(restored), base_fingerprint(jlora.dequantize(q)),
                    base_fingerprint(jlora.quantize(model.params, "int8"))}
    assert len(fingerprints) == 3  # restored == saved; the float and int8 bases differ


def test_bad_input_names_the_leaf():
    model = _llama(1, hidden=96)  # 96 is not a multiple of NF4's blocks of 64
    with pytest.raises(ValueError, match=r"model/layers/0/self_attn/q_proj/kernel: NF4 blocks of 64 do not divide"):
        jlora.quantize(model.params, "nf4")
    assert jlora.is_quantized(jlora.quantize(model.params, "int8")["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"])
    lora = jlora.init(jax.random.key(0), model.params, CONFIG_LLAMA)
    with pytest.raises(ValueError, match=r"'model/layers/0/self_attn/q_proj/lora_a' is a LoRA adapter leaf"):
        jlora.quantize(jlora.combine(model.params, lora), "int8")
    with pytest.raises(ValueError, match="fmt must be 'nf4' or 'int8', got 'q4_k'"):
        jlora.quantize(model.params, "q4_k")
    with pytest.raises(ValueError, match="no kernel was selected"):
        jlora.quantize(model.params, "int8", include=["nothing_here"])
    with pytest.raises(ValueError, match=r"every selected kernel is quantized already, e.g. model/layers/0/\S+ \(int8\)"):
        jlora.quantize(jlora.quantize(model.params, "int8"), "int8")


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_hf_family_computes_over_an_int8_base(name):
    """The default selection (kernels of numbered blocks) on every supported family, GPT-2's
    transposed Conv1D and T5's encoder-decoder included: apply over it = apply over its dequantization."""
    case = CASES[name]
    model = case.model()
    q = jlora.quantize(model.params, "int8")
    n = sum(jlora.is_quantized(x) for x in jax.tree_util.tree_leaves(q, is_leaf=jlora.is_quantized))
    assert n >= 8, n  # every projection of both layers
    config = jlora.hf.default_config(model, r=2, init_lora_weights=False)
    lora = jlora.init(jax.random.key(0), q, config)
    f = jlora.apply(model, config)
    inputs = case.inputs()
    want = f(jlora.dequantize(q), lora, **inputs).logits
    np.testing.assert_allclose(f(q, lora, **inputs).logits, want, rtol=1e-5, atol=1e-5)
    merged = jlora.merge(q, lora, config)
    np.testing.assert_allclose(model(**inputs, params=merged).logits, want, rtol=1e-4, atol=1e-4)


def test_quantized_heads_and_tables_with_adapters_on_the_tied_weight():
    """An untied quantized lm_head beside an adapted embedding (the head's own dequantized call is not
    taken for a tied head), and GPT-2's tied head reading an int8 table transposed: apply = merge,
    gradients flow."""
    llama = CASES["llama"].model()
    gpt2 = CASES["gpt2"].model()
    ids = np.arange(3, 19, dtype=np.int32).reshape(2, 8)
    for model, kwargs, targets in ((llama, dict(lm_head=True), ("embed_tokens", "q_proj")),
                                   (gpt2, dict(embeddings=True), ("wte", "c_attn"))):
        config = jlora.LoraConfig(r=2, target_modules=targets, init_lora_weights=False)
        q = jlora.quantize(model.params, "int8", **kwargs)
        lora = jlora.init(jax.random.key(0), q, config)
        f = jlora.apply(model, config)
        want = model(ids, params=jlora.merge(q, lora, config)).logits
        np.testing.assert_allclose(f(q, lora, ids).logits, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(f(q, lora, ids).logits, f(jlora.dequantize(q), lora, ids).logits, atol=1e-5)
        grads = jax.grad(lambda lo: f(q, lo, ids).logits.sum())(lora)
        assert all(np.isfinite(g).all() and np.abs(g).max() > 0 for g in jax.tree_util.tree_leaves(grads))


def test_misuse_of_a_quantized_tree_is_named():
    model = _llama(1)
    q = jlora.quantize(model.params, "nf4")
    ids = jnp.ones((1, 8), jnp.int32)
    with pytest.raises(ValueError, match=r"embeddings=True with 'nf4'.*int8 first"):
        jlora.quantize(model.params, "nf4", embeddings=True)
    cast = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), q)  # codes and scales cast too
    f = jlora.apply(model, CONFIG_LLAMA)
    lora = jlora.init(jax.random.key(0), q, CONFIG_LLAMA)
    with pytest.raises(ValueError, match=r"the quantized kernel of 'model/layers/0/\S+': NF4Kernel \(nf4\): its codes "
                                         r"are bfloat16, expected uint8: was the quantized tree cast"):
        f(cast, lora, ids)
    with pytest.raises(TypeError, match=r"a quantized kernel \(NF4Kernel, nf4, shape \(128, 128\)\) was used as an "
                                        r"array: call the model through jlora.apply"):
        jnp.asarray(q["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [jnp.int8, jnp.int32, "int8", bool, "nonsense"])
def test_a_non_float_dequantized_dtype_is_refused_naming_dtype(fmt, dtype):
    params = {"layers": {"0": {"q": {"kernel": jnp.full((64, 8), 0.5)}}}}
    with pytest.raises(ValueError, match=r"jlora.quantize: dtype= must be a floating-point dtype .*got "):
        jlora.quantize(params, fmt, dtype=dtype)
    with pytest.raises(ValueError, match=r"jlora.dequantize: dtype= must be a floating-point dtype"):
        jlora.dequantize(jlora.quantize(params, fmt), dtype=dtype)
    q = jlora.quantize(params, fmt, dtype="bfloat16")  # a float dtype by name is fine
    assert jlora.dequantize(q)["layers"]["0"]["q"]["kernel"].dtype == jnp.bfloat16


def test_unmerge_over_a_quantized_base_is_refused():
    params = {"layers": {"0": {"q": {"kernel": jnp.full((64, 8), 0.5)}, "k": {"kernel": jnp.full((64, 8), 0.25)}}}}
    config = jlora.LoraConfig(r=2, target_modules=("q",), init_lora_weights=False)
    q = jlora.quantize(params, "int8")
    lora = jlora.init(jax.random.key(0), q, config)
    with pytest.raises(ValueError, match=r"jlora.unmerge: 'layers/0/\w/kernel' is a quantized kernel \(int8\).*"
                                         r"jlora.merge over a quantized base returns a float model"):
        jlora.unmerge(q, lora, config)
    merged = jlora.merge(q, lora, config)  # the float model merge gives back unmerges
    back = jlora.unmerge(merged, lora, config)
    np.testing.assert_allclose(back["layers"]["0"]["q"]["kernel"], jlora.dequantize(q)["layers"]["0"]["q"]["kernel"],
                               atol=1e-5)
