"""jlora.generate: the KV-cache sampler against transformers' own generate, LoRA unmerged vs merged,
nucleus sampling, eos handling, compilation caching and input errors (tiny random-init models)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "FlaxLlamaForCausalLM"):
    pytest.skip("this transformers has no Flax models", allow_module_level=True)

import jlora  # noqa: E402
from jlora.generate import _compiled, generate, next_token, nucleus_filter  # noqa: E402
from jlora.hf.llama import FlaxLlamaForCausalLMFixed  # noqa: E402

N = 6  # new tokens
PROMPTS = np.random.RandomState(0).randint(0, 128, (3, 5)).astype(np.int32)
MASK = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]], np.int32)  # left padding
LLAMA_LORA = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"))


def _llama(tied: bool) -> FlaxLlamaForCausalLMFixed:
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0, tie_word_embeddings=tied,
        initializer_range=0.2)  # wide init: varied greedy tokens
    return FlaxLlamaForCausalLMFixed(config, seed=0)


@pytest.fixture(scope="module")
def llama():
    return _llama(tied=False)


@pytest.fixture(scope="module")
def llama_tied():
    return _llama(tied=True)


@pytest.fixture(scope="module")
def gpt2():
    config = transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     initializer_range=0.2)
    return transformers.FlaxGPT2LMHeadModel(config, seed=0)


def _hf(model, mask=None, **kwargs):
    """transformers' greedy generate: the new tokens (batch, N)."""
    out = model.generate(PROMPTS, attention_mask=mask, params=model.params, max_new_tokens=N, do_sample=False,
                         trace=False,  # a Python loop: quicker than compiling its while_loop here
                         **{"pad_token_id": 0, **kwargs})
    return np.asarray(out.sequences)[:, PROMPTS.shape[1]:]


def _adapter(model, config, seed=0):
    """An adapter whose lora_b is random (nonzero), so it changes the outputs."""
    lora = jlora.init(jax.random.key(seed), model.params, config)
    key = jax.random.key(seed + 1)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: 0.5 * jax.random.normal(jax.random.fold_in(key, len(str(path))), x.shape, x.dtype)
        if "lora_b" in jax.tree_util.keystr(path) else x, lora)


# --- 1. greedy == transformers' generate ------------------------------------------------------

def test_greedy_matches_transformers_llama_untied(llama):
    np.testing.assert_array_equal(generate(llama, llama.params, PROMPTS, max_new_tokens=N), _hf(llama))  # no padding


@pytest.mark.parametrize("name", ["llama_tied", "gpt2"])
def test_greedy_matches_transformers_left_padded(name, request):
    model = request.getfixturevalue(name)
    ours = np.asarray(generate(model, model.params, PROMPTS, prompt_mask=MASK, max_new_tokens=N))
    np.testing.assert_array_equal(ours, _hf(model, MASK))
    assert len(np.unique(ours)) > 1


# --- 2. LoRA unmerged == merged ----------------------------------------------------------------

@pytest.mark.parametrize("name,config", [
    ("llama_tied", LLAMA_LORA),
    ("llama_tied", jlora.LoraConfig(r=4, lora_alpha=8, target_modules=("v_proj", "embed_tokens"))),  # tied head
    ("gpt2", jlora.LoraConfig(r=4, lora_alpha=8, target_modules=("c_attn",))),
])
def test_lora_unmerged_equals_merged(name, config, request):
    model = request.getfixturevalue(name)
    lora = _adapter(model, config)
    tokens, logits = generate(model, model.params, PROMPTS, lora=lora, config=config, prompt_mask=MASK,
                              max_new_tokens=N, return_logits=True)
    merged = jlora.merge(model.params, lora, config)
    tokens_m, logits_m = generate(model, merged, PROMPTS, prompt_mask=MASK, max_new_tokens=N, return_logits=True)
    np.testing.assert_array_equal(tokens, tokens_m)
    np.testing.assert_allclose(logits, logits_m, rtol=1e-4, atol=1e-4)
    base = np.asarray(generate(model, model.params, PROMPTS, prompt_mask=MASK, max_new_tokens=N))
    assert (base != np.asarray(tokens)).any(), "the adapter should change some row's tokens"


# --- 3. temperature / top-p --------------------------------------------------------------------

def _sample(model, rng, **kwargs):
    """Sampled tokens and their logits (one compilation for every temperature / top_p)."""
    tokens, logits = generate(model, model.params, PROMPTS, prompt_mask=MASK, max_new_tokens=N, rng=rng,
                              return_logits=True, eos_token_id=None, **{"temperature": 1.5, **kwargs})
    return np.asarray(tokens), np.asarray(logits)


def test_sampling_is_reproducible_and_top_p_tiny_is_greedy(llama):
    first, again = _sample(llama, jax.random.key(1))[0], _sample(llama, jax.random.key(1))[0]
    np.testing.assert_array_equal(first, again)
    assert (first != _sample(llama, jax.random.key(2))[0]).any()
    greedy = np.asarray(generate(llama, llama.params, PROMPTS, prompt_mask=MASK, max_new_tokens=N))
    np.testing.assert_array_equal(_sample(llama, jax.random.key(3), top_p=1e-6)[0], greedy)


def test_sampled_tokens_lie_in_the_nucleus(llama):
    temperature, top_p = 0.7, 0.6
    tokens, logits = _sample(llama, jax.random.key(4), temperature=temperature, top_p=top_p)
    allowed = np.isfinite(np.asarray(nucleus_filter(logits / temperature, top_p)))
    assert np.take_along_axis(allowed, tokens[..., None], -1).all()
    assert (allowed.sum(-1) < allowed.shape[-1]).all()  # the nucleus really excludes tokens


def test_nucleus_filter_by_hand():
    logits = jnp.log(jnp.array([[0.15, 0.5, 0.05, 0.3], [0.1, 0.4, 0.4, 0.1]]))  # ties: ranked by index
    keep = lambda p: np.isfinite(np.asarray(nucleus_filter(logits, p)))
    np.testing.assert_array_equal(keep(0.79), [[False, True, False, True], [False, True, True, False]])
    np.testing.assert_array_equal(keep(0.81), [[True, True, False, True], [True, True, True, False]])
    np.testing.assert_array_equal(keep(1e-6), [[False, True, False, False], [False, True, False, False]])
    assert keep(1.0).all()
    draws = jax.vmap(lambda k: next_token(logits, greedy=False, top_p=0.79, key=k))(
        jax.random.split(jax.random.key(0), 512))
    assert set(np.asarray(draws)[:, 0].tolist()) == {1, 3}
    assert set(np.asarray(draws)[:, 1].tolist()) == {1, 2}


_filter = jax.jit(nucleus_filter)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-8, 8), min_size=8, max_size=8), st.floats(1e-3, 1.0))
def test_nucleus_is_the_smallest_top_set_with_mass_top_p(values, top_p):
    logits = np.asarray(values, np.float32)
    kept = np.isfinite(np.asarray(_filter(jnp.asarray(logits), top_p)))
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert kept[np.argmax(logits)]
    if kept.sum() < len(kept):
        assert probs[kept].min() >= probs[~kept].max() - 1e-6  # the most likely tokens
        assert probs[kept].sum() >= top_p - 1e-5  # enough mass
    assert probs[kept].sum() - probs[kept].min() < top_p + 1e-5  # and no smaller set has it


# --- 4. eos --------------------------------------------------------------------------------------

def test_eos_then_pad_matches_transformers(llama):
    greedy = np.asarray(generate(llama, llama.params, PROMPTS, prompt_mask=MASK, max_new_tokens=N))
    eos = int(greedy[0, 2])  # row 0 stops at step 2 (or earlier)
    ours = np.asarray(generate(llama, llama.params, PROMPTS, prompt_mask=MASK, max_new_tokens=N,
                               eos_token_id=eos, pad_token_id=127))
    np.testing.assert_array_equal(ours, _hf(llama, MASK, eos_token_id=eos, pad_token_id=127))
    for row, want in zip(ours, greedy):
        hit = np.flatnonzero(want == eos)
        stop = hit[0] if len(hit) else N
        np.testing.assert_array_equal(row[:stop + 1], want[:stop + 1])
        assert (row[stop + 1:] == 127).all()


def test_loop_stops_when_every_row_emitted_eos(llama):
    greedy = np.asarray(generate(llama, llama.params, PROMPTS, prompt_mask=MASK, max_new_tokens=N))
    eos = tuple(int(t) for t in greedy[:, 0])  # every row stops at step 0
    tokens, logits = generate(llama, llama.params, PROMPTS, prompt_mask=MASK, max_new_tokens=N, eos_token_id=eos,
                              return_logits=True)
    np.testing.assert_array_equal(np.asarray(tokens)[:, 0], greedy[:, 0])
    assert (np.asarray(tokens)[:, 1:] == eos[0]).all()  # pad defaults to the (first) eos
    assert not np.asarray(logits)[:, 1:].any()  # the later steps never ran


# --- 5. one compilation per shapes / settings ---------------------------------------------------

def test_no_recompilation_for_new_params_lora_prompts(llama_tied):
    model = llama_tied
    run = lambda params, lora, prompts, **kw: generate(model, params, prompts, lora=lora, config=LLAMA_LORA,
                                                       prompt_mask=MASK, max_new_tokens=N, return_logits=True, **kw)
    sampler = _compiled(model, LLAMA_LORA)
    run(model.params, _adapter(model, LLAMA_LORA, 0), PROMPTS)
    run(model.params, _adapter(model, LLAMA_LORA, 0), PROMPTS, temperature=1.0, top_p=0.9, rng=jax.random.key(0))
    size = sampler._cache_size()
    params = jax.tree_util.tree_map(lambda x: x * 1.01, model.params)
    run(params, _adapter(model, LLAMA_LORA, 5), (PROMPTS + 1) % 128)
    run(params, _adapter(model, LLAMA_LORA, 6), PROMPTS[::-1], temperature=0.5, top_p=0.5, rng=jax.random.key(9))
    assert sampler._cache_size() == size == 2  # greedy and sampled: nothing else


# --- 6. bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("change,match", [
    ({"prompt_ids": PROMPTS[0]}, "prompt_ids"),
    ({"prompt_ids": PROMPTS.astype(np.float32)}, "prompt_ids"),
    ({"prompt_ids": PROMPTS + 128}, "prompt_ids"),
    ({"prompt_mask": MASK[:, 1:]}, "prompt_mask"),
    ({"prompt_mask": MASK[:, ::-1]}, "prompt_mask.*LEFT"),
    ({"prompt_mask": MASK * 2}, "prompt_mask"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 2.0}, "max_new_tokens"),
    ({"max_new_tokens": 60}, "max_new_tokens.*max_position_embeddings"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"temperature": 1.0}, "rng"),
    ({"temperature": 1.0, "rng": 0}, "rng must be a jax.random key"),
    ({"lora": {}}, "config"),
])
def test_bad_input_names_the_parameter(llama, change, match):
    kwargs = {"prompt_ids": PROMPTS, "prompt_mask": MASK, "max_new_tokens": N, **change}
    with pytest.raises(ValueError, match=match):
        generate(llama, llama.params, kwargs.pop("prompt_ids"), **kwargs)


# --- 7. a different adapter per row (jlora.bank) ---------------------------------------------------

def test_each_row_with_its_own_adapter_equals_generating_it_alone_merged(llama):
    from jlora import bank as jb
    from jlora.generate import BANKED
    configs = [LLAMA_LORA, jlora.LoraConfig(r=2, lora_alpha=8, target_modules=("q_proj", "k_proj", "o_proj")),
               jlora.LoraConfig(r=8, lora_alpha=8, target_modules=("v_proj", "down_proj"), use_rslora=True)]
    adapters = [(_adapter(llama, c, seed=3 * i), c) for i, c in enumerate(configs)]
    cover = jlora.LoraConfig(r=8, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"))
    bank = jb.stack(adapters[:2], llama.params, size=4, cover=cover)  # room for adapters put later
    prompts = np.concatenate([PROMPTS, PROMPTS[::-1]])
    mask = np.concatenate([MASK, MASK[::-1]])
    ids = np.array([0, 1, -1, 1, 0, 0])
    got = generate(llama, llama.params, prompts, prompt_mask=mask, max_new_tokens=N, bank=bank, adapter_ids=ids)
    sampler = _compiled(llama, BANKED)
    size = sampler._cache_size()
    bank = jb.put(bank, 2, *adapters[2], llama.params)       # hot swap into a free slot: same shapes
    ids2 = np.array([2, 2, 0, -1, 1, 2])
    got2 = generate(llama, llama.params, prompts, prompt_mask=mask, max_new_tokens=N, bank=bank, adapter_ids=ids2)
    assert sampler._cache_size() == size == 1
    for tokens, row_ids in ((got, ids), (got2, ids2)):
        for b, i in enumerate(row_ids):
            params = llama.params if i < 0 else jlora.merge(llama.params, *adapters[i])
            # the row's own left padding stripped: generating it alone, as its own batch of one
            start = int(np.argmax(mask[b]))
            alone = generate(llama, params, prompts[b:b + 1, start:], max_new_tokens=N)
            np.testing.assert_array_equal(tokens[b], alone[0], err_msg=f"row {b}, adapter {i}")
    assert len({tuple(np.asarray(t)) for t in got2}) > 3   # the adapters do change the tokens


@pytest.mark.parametrize("kwargs,match", [
    ({"adapter_ids": [0, 1, 0]}, "adapter_ids needs bank="),
    ({"bank": "bank"}, "adapter_ids needs bank="),
    ({"bank": True, "adapter_ids": [0, 1]}, "one id per prompt row"),
    ({"bank": True}, "bank= needs adapter_ids="),
    ({"bank": True, "adapter_ids": [0, 5, 0]}, r"ids must lie in \[-1, 2\)"),
    ({"bank": True, "adapter_ids": [0, 1, 0], "lora": {}}, "either lora= .* or bank="),
])
def test_bank_bad_input_names_the_parameter(llama, kwargs, match):
    from jlora import bank as jb
    if kwargs.get("bank") is True:
        kwargs["bank"] = jb.stack([(_adapter(llama, LLAMA_LORA), LLAMA_LORA)] * 2, llama.params)
    with pytest.raises(ValueError, match=match):
        generate(llama, llama.params, PROMPTS, max_new_tokens=N, **kwargs)
