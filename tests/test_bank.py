"""jlora.bank: N adapters in one batch. Each example's output equals its own merged model's; hot swap
does not recompile; multi-tenant gradients stay with their own examples; banks shard and quantize."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jlora
from jlora import bank as jb
from jlora.layers import dense_delta
from jlora.tree import unflatten
from models import TinyLM, init_model, randomize_lora

IDS = np.array([0, 1, 2, -1, 1, 0])
TOKENS = np.random.RandomState(0).randint(0, 16, (len(IDS), 5)).astype(np.int32)
CONFIGS = [  # ranks, targets, rslora and patterns all differ
    jlora.LoraConfig(r=2, lora_alpha=4, target_modules=("query", "value")),
    jlora.LoraConfig(r=4, lora_alpha=4, target_modules=("query", "value", "out", "fc1"), use_rslora=True),
    jlora.LoraConfig(r=3, lora_alpha=12, target_modules=("value", "fc1"), rank_pattern={"fc1": 1}),
]


@functools.lru_cache(maxsize=None)
def _setup(scan=False, remat=False):
    model = TinyLM(scan=scan, remat=remat, layers=2)
    variables = init_model(model, ((1, 5), jnp.int32))
    adapters = [(randomize_lora(jlora.init(jax.random.key(i), variables, c, model=model.apply,
                                           inputs=(jnp.zeros((1, 5), jnp.int32),)), seed=i + 1), c)
                for i, c in enumerate(CONFIGS)]
    return model, variables, adapters


def _merged_rows(model, variables, adapters, ids, tokens):
    rows = []
    for b, i in enumerate(ids):
        merged = variables if i < 0 else jlora.merge(variables, *adapters[i], model=model.apply,
                                                     inputs=(tokens[:1],))
        rows.append(model.apply(merged, tokens[b:b + 1])[0])
    return np.stack(rows)


@pytest.mark.parametrize("scan,remat", [(False, False), (True, False), (True, True)])
def test_each_example_gets_its_own_merged_model(scan, remat):
    model, variables, adapters = _setup(scan, remat)
    bank = jb.stack(adapters, variables, size=4)
    assert (bank.size, bank.rank, bank.occupied()) == (4, 4, [0, 1, 2])
    out = jax.jit(jb.apply(model.apply))(variables, bank, IDS, TOKENS)
    np.testing.assert_allclose(out, _merged_rows(model, variables, adapters, IDS, TOKENS), atol=2e-5)


def test_take_gives_back_each_adapter_and_its_config():
    model, variables, adapters = _setup(scan=True)
    bank = jb.stack(adapters, variables)
    for i, (lora, config) in enumerate(adapters):
        got, got_config = jb.take(bank, i)
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(lora)
        jax.tree_util.tree_map(np.testing.assert_array_equal, got, lora)
        merged = jlora.merge(variables, got, got_config, model=model.apply, inputs=(TOKENS[:1],))
        want = jlora.merge(variables, lora, config, model=model.apply, inputs=(TOKENS[:1],))
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), merged, want)


def test_gpt2_fused_c_attn_bank_equals_merged():
    transformers = pytest.importorskip("transformers")
    model = transformers.FlaxGPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2,
                                                                     n_positions=16), seed=0)
    configs = [jlora.LoraConfig(r=2, lora_alpha=4, target_modules=("c_attn",)),
               jlora.LoraConfig(r=4, lora_alpha=8, target_modules=("c_attn", "c_fc"))]
    adapters = [(randomize_lora(jlora.init(jax.random.key(i), model.params, c), seed=i), c)
                for i, c in enumerate(configs)]
    bank = jb.stack(adapters, model.params)
    ids = np.array([1, -1, 0])
    tokens = TOKENS[:3] * 3
    out = jb.apply(model)(model.params, bank, ids, tokens).logits
    for b, i in enumerate(ids):
        params = model.params if i < 0 else jlora.merge(model.params, *adapters[i])
        np.testing.assert_allclose(out[b], model(tokens[b:b + 1], params=params).logits[0], atol=2e-5)


def test_hot_swap_does_not_recompile():
    model, variables, adapters = _setup(scan=True)
    bank = jb.stack(adapters[:2], variables, size=3, rank=4)
    forward = jax.jit(jb.apply(model.apply))
    forward(variables, bank, IDS % 2, TOKENS)
    compiled = forward._cache_size()
    bank = jb.put(bank, 2, *adapters[2], variables)        # fill a free slot
    out = forward(variables, bank, IDS, TOKENS)
    np.testing.assert_allclose(out, _merged_rows(model, variables, adapters, IDS, TOKENS), atol=2e-5)
    swapped = jb.put(bank, 0, *adapters[1], variables)    # replace a used one
    out = forward(variables, swapped, np.zeros(len(IDS), np.int32), TOKENS)
    np.testing.assert_allclose(out, _merged_rows(model, variables, adapters, np.ones(len(IDS), int), TOKENS),
                               atol=2e-5)
    emptied = jb.clear(swapped, 1)
    np.testing.assert_allclose(forward(variables, emptied, np.ones(len(IDS), np.int32), TOKENS),
                               model.apply(variables, TOKENS), atol=1e-6)
    assert emptied.occupied() == [0, 2]
    assert forward._cache_size() == compiled == 1


def test_multi_tenant_gradients_come_only_from_own_examples():
    model, variables, adapters = _setup(scan=True)
    bank = jb.stack(adapters, variables, size=4)
    targets = jnp.asarray(np.random.RandomState(1).randint(0, 16, TOKENS.shape))

    def per_example_loss(logits, rows=slice(None)):
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[rows][..., None], -1)[..., 0].sum(-1)

    def bank_loss(factors):
        logits = jb.apply(model.apply)(variables, bank.replace(factors=factors), IDS, TOKENS)
        return per_example_loss(logits).sum()

    grads = jax.grad(bank_loss)(bank.factors)
    for i, (lora, config) in enumerate(adapters):
        rows = np.flatnonzero(IDS == i)
        alone = jax.grad(lambda l: per_example_loss(jlora.apply(model.apply, config)(variables, l, TOKENS[rows]), rows).sum(
            ))(lora)
        as_bank = jb.stack([(alone, config)], variables, rank=bank.rank)  # padded like the bank
        for rec in bank.targets:
            got = jb._leaf(grads, rec.module_key)
            want = jb._leaf(as_bank.factors, rec.module_key) if rec in as_bank.targets else None
            for key in ("lora_a", "lora_b"):
                slot = np.take(np.asarray(got[key]), i, axis=rec.stack_dims)
                expected = np.zeros_like(slot) if want is None else np.take(np.asarray(want[key]), 0, axis=rec.stack_dims)
                rank = jb._leaf(bank.ranks, rec.module_key)[i]
                if key == "lora_a":   # padded rank columns get no gradient: zero in lora_b keeps them out
                    slot, expected = slot[..., :rank], expected[..., :rank]
                # float32 rounding: the bank sums the rows' contributions in another order (jax 0.12: 3.5e-6 relative)
                np.testing.assert_allclose(slot, expected, rtol=1e-5, atol=1e-5, err_msg=f"{rec.path} {key} slot {i}")
    unused = jb._leaf(grads, bank.targets[0].module_key)
    assert not np.asarray(jnp.take(unused["lora_a"], 3, axis=bank.targets[0].stack_dims)).any()  # slot 3: no examples


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 5), n=st.integers(1, 4), rank=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_bank_delta_is_each_examples_dense_delta(batch, n, rank, seed):
    rng = np.random.RandomState(seed)
    x = rng.normal(size=(batch, 3, 6)).astype(np.float32)
    a, b = rng.normal(size=(n, 6, rank)).astype(np.float32), rng.normal(size=(n, rank, 5)).astype(np.float32)
    scales = rng.uniform(0.5, 2, n).astype(np.float32)
    ids = rng.randint(-1, n, batch)
    slot = np.clip(ids, 0, None)
    got = jb.bank_delta(jnp.asarray(x), a[slot], b[slot], np.where(ids >= 0, scales[slot], 0))
    for i in range(batch):
        want = 0 * x[i, :, :5] if ids[i] < 0 else dense_delta(x[i], a[ids[i]], b[ids[i]], float(scales[ids[i]]))
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bank_axis", [None, "data"])
def test_sharded_batch_and_bank(bank_axis):
    model, variables, adapters = _setup(scan=True)
    bank = jb.stack(adapters, variables, size=8)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    ids = np.array([0, 1, 2, -1, 1, 0, 2, 2])
    tokens = np.random.RandomState(3).randint(0, 16, (8, 5)).astype(np.int32)

    def place(x, slot_axis):
        spec = [None] * x.ndim
        if bank_axis is not None:
            spec[slot_axis] = bank_axis
        return jax.device_put(x, NamedSharding(mesh, P(*spec)))

    factors = {}
    for rec in bank.targets:
        for key, leaf in jb._leaf(bank.factors, rec.module_key).items():
            factors[(*rec.module_key, key)] = place(leaf, rec.stack_dims)
    sharded = jb.AdapterBank(unflatten(factors), jax.tree_util.tree_map(lambda x: place(x, 0), bank.scales),
                             bank.ranks, bank.targets, bank.rank, bank.in_variables)
    batch = NamedSharding(mesh, P("data"))
    out = jax.jit(jb.apply(model.apply))(variables, sharded, jax.device_put(ids, batch),
                                         jax.device_put(tokens, batch))
    np.testing.assert_allclose(out, _merged_rows(model, variables, adapters, ids, tokens), atol=2e-5)


def test_bank_over_a_quantized_base():
    transformers = pytest.importorskip("transformers")
    from jlora.hf.llama import FlaxLlamaForCausalLMFixed
    model = FlaxLlamaForCausalLMFixed(transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32), seed=0)
    base = jlora.quantize(model.params, "int8")
    config = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"))
    adapters = [(randomize_lora(jlora.init(jax.random.key(i), model.params, config), seed=i, scale=0.05), config)
                for i in range(2)]
    bank = jb.stack(adapters, base)
    ids = np.array([1, 0, -1])
    out = jb.apply(model)(base, bank, ids, TOKENS[:3]).logits
    for b, i in enumerate(ids):
        if i >= 0:
            want = jlora.apply(model, config)(base, adapters[i][0], TOKENS[b:b + 1]).logits
        else:
            with jlora.quantized_layers():
                want = model(TOKENS[b:b + 1], params=base).logits
        np.testing.assert_allclose(out[b], want[0], atol=3e-5)


@pytest.mark.parametrize("call,match", [
    (lambda m, v, a, bank: jb.apply(m.apply)(v, bank, IDS + 3, TOKENS), r"adapter_ids: ids must lie in \[-1, 3\)"),
    (lambda m, v, a, bank: jb.apply(m.apply)(v, bank, IDS[:2], TOKENS), "axis 0 .* not the 2 adapter_ids"),
    (lambda m, v, a, bank: jb.apply(m.apply)(v, bank, IDS.astype(float), TOKENS), "adapter_ids: expected a 1-D integer"),
    (lambda m, v, a, bank: jb.apply(m.apply)(v, a[0][0], IDS, TOKENS), "bank must be a jlora.bank.AdapterBank"),
    (lambda m, v, a, bank: jb.put(bank, 3, *a[0], v), r"slot must be an int in \[0, 3\)"),
    (lambda m, v, a, bank: jb.put(bank, 0, randomize_lora(jlora.init(
        jax.random.key(0), v, jlora.LoraConfig(r=8, target_modules=("query",)), model=m.apply,
        inputs=(TOKENS[:1],))), jlora.LoraConfig(r=8, target_modules=("query",)), v),
     "rank 8 .* above the bank's rank 4"),
    (lambda m, v, a, bank: jb.put(bank, 0, jlora.init(jax.random.key(0), v, jlora.LoraConfig(
        r=2, target_modules=("key",)), model=m.apply, inputs=(TOKENS[:1],)), jlora.LoraConfig(
        r=2, target_modules=("key",)), v), "no entry for"),
    (lambda m, v, a, bank: jb.stack([a[0][0]], v), r"adapters\[0\] must be a \(lora, LoraConfig\) pair"),
    (lambda m, v, a, bank: jb.stack(a, v, size=2), r"size must be an int >= max\(1, the 3 adapters given\), got 2"),
    (lambda m, v, a, bank: jb.stack(a, v, rank=2), "rank=2 is below the largest adapter rank 4"),
    (lambda m, v, a, bank: jb.stack([(jlora.init(jax.random.key(0), v, jlora.LoraConfig(
        r=2, target_modules=("embed",))), jlora.LoraConfig(r=2, target_modules=("embed",)))], v),
     "embedding table"),
    (lambda m, v, a, bank: jb.stack([], v, size=4), "adapters is empty; .* cover="),
    (lambda m, v, a, bank: jb.apply(m.apply)(v, bank, ["0", "1", "2", "-1", "1", "0"], TOKENS),
     "adapter_ids: expected a 1-D integer array"),
    (lambda m, v, a, bank: jb.apply(m.apply)(v, bank, np.array([0, 1, 2, 2 ** 33, 0, 0]), TOKENS),
     r"ids must lie in \[-1, 3\).*8589934592"),                           # checked before any int32 wrap
    (lambda m, v, a, bank: jb.apply(m.apply)(v, bank, None, TOKENS), "adapter_ids is required"),
    (lambda m, v, a, bank: jb.apply(m.apply)(v, jb.rows(bank, IDS), IDS, TOKENS), "pass adapter_ids=None"),
    (lambda m, v, a, bank: jb.stack(a, v, dtype=jnp.int8), "dtype must be a floating dtype"),
    (lambda m, v, a, bank: jb.apply(TinyLM(scan=True, d=16).apply)(
        init_model(TinyLM(scan=True, d=16), ((1, 5), jnp.int32)), bank, IDS, TOKENS),
     "contracts inputs of shape \\(16,\\) but the bank's factors .* another model"),
])
def test_bad_input_names_the_parameter(call, match):
    model, variables, adapters = _setup(scan=True)
    bank = jb.stack(adapters, variables)
    with pytest.raises((ValueError, TypeError), match=match):
        call(model, variables, adapters, bank)


def test_an_empty_bank_with_room_is_filled_later():
    model, variables, adapters = _setup(scan=True)
    cover = jlora.LoraConfig(r=4, target_modules=("query", "value", "out", "fc1"))
    bank = jb.stack([], variables, size=2, cover=cover, model=model.apply, inputs=(TOKENS[:1],))
    assert bank.occupied() == [] and bank.rank == 4 and bank.factors  # float32 zeros, all slots free
    np.testing.assert_allclose(jb.apply(model.apply)(variables, bank, [0, 1, -1, 0, 1, 1], TOKENS),
                               model.apply(variables, TOKENS), atol=1e-6)
    bank = jb.put(jb.put(bank, 1, *adapters[2], variables), 0, *adapters[1], variables)
    ids = np.array([1, 0, -1, 0, 1, 1])
    np.testing.assert_allclose(jb.apply(model.apply)(variables, bank, ids, TOKENS),
                               _merged_rows(model, variables, [adapters[1], adapters[2]], ids, TOKENS), atol=2e-5)


def test_rows_bank_equals_the_gather_and_bad_ids_under_jit_give_nan_rows():
    model, variables, adapters = _setup(scan=True)
    bank = jb.stack(adapters, variables)
    forward = jb.apply(model.apply)
    np.testing.assert_allclose(forward(variables, jb.rows(bank, IDS), None, TOKENS),
                               forward(variables, bank, IDS, TOKENS), atol=1e-6)
    out = jax.jit(forward)(variables, bank, jnp.array([0, 7, -1, -3, 1, 2]), TOKENS)   # unchecked under jit
    assert np.isnan(out[1]).all() and np.isnan(out[3]).all()                          # never a wrong adapter
    good = [0, 2, 4, 5]
    np.testing.assert_allclose(np.asarray(out)[good], forward(variables, bank, IDS[[0, 3, 4, 2]], TOKENS[good]),
                               atol=1e-6)
    assert jb.put(bank, jnp.int32(1), *adapters[0], variables).occupied() == [0, 1, 2]  # a jax int as the slot
