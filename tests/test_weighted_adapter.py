"""jlora.weighted_adapter against PEFT's add_weighted_adapter (real PEFT on PyTorch), plus properties.

DARE draws its masks from jax's RNG, PEFT from torch's: the PEFT comparison of the dare types records
PEFT's masks (torch.bernoulli spied, not replaced) and hands them to jlora through ``_keep_mask``,
so everything but the draw is compared; the draw itself is checked for its kept fraction.
"""
import dataclasses
import itertools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jlora
import jlora.weighted as weighted
from hf_cases import CASES

FACTOR = ["linear", "ties", "magnitude_prune", "dare_linear", "dare_ties"]
SVD = ["svd", "ties_svd", "magnitude_prune_svd", "dare_linear_svd", "dare_ties_svd"]
_names = (f"mix{i}" for i in itertools.count())


def _trained(model, config, seed):
    """Adapters that look trained (lora_b not zero), as tests/test_hf_peft.py makes them."""
    lora = jlora.init(jax.random.key(0), model.params, config)
    leaves, tree = jax.tree_util.tree_flatten(lora)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _env(case_name, configs, tmp_path_factory):
    pytest.importorskip("torch")
    PeftModel = pytest.importorskip("peft").PeftModel
    from test_hf_peft import torch_base
    case = CASES[case_name]
    model = case.model()
    configs = [jlora.hf.default_config(model, **c) for c in configs]
    adapters = [(_trained(model, c, seed=3 + i), c) for i, c in enumerate(configs)]
    folder = tmp_path_factory.mktemp(case_name)
    for i, (lora, config) in enumerate(adapters):
        jlora.hf.save_peft(folder / f"a{i}", model, lora, config)
    peft = PeftModel.from_pretrained(torch_base(case, model, folder / "base"), folder / "a0", adapter_name="a0")
    for i in range(1, len(adapters)):
        peft.load_adapter(folder / f"a{i}", adapter_name=f"a{i}")
    return types.SimpleNamespace(case=case, model=model, adapters=adapters, peft=peft.eval(),
                                 modules=dict(peft.base_model.model.named_modules()))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _env("llama", [
        dict(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj", "o_proj"), rank_pattern={"o_proj": 2},
             alpha_pattern={"q_proj": 4}),
        dict(r=4, lora_alpha=16, target_modules=("q_proj", "k_proj", "v_proj")),
        dict(r=2, lora_alpha=2, target_modules=("q_proj", "v_proj", "up_proj")),
        dict(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"), use_rslora=True),
    ], tmp_path_factory)


def has_adapter(layer, name):
    return name in getattr(layer, "lora_A", {}) or name in getattr(layer, "lora_embedding_A", {})


def record_peft_masks(env, monkeypatch, name, ct, idx):
    """Run PEFT's combination with torch.bernoulli spied: ``{(module, part, adapter index): mask}``."""
    import torch
    drawn, real = [], torch.bernoulli
    monkeypatch.setattr(torch, "bernoulli", lambda *a, **k: drawn.append(real(*a, **k)) or drawn[-1])
    yield
    monkeypatch.setattr(torch, "bernoulli", real)
    order = iter(drawn)
    masks = {}
    for module, layer in env.peft.base_model.model.named_modules():
        if has_adapter(layer, name):  # PEFT's order: modules, then A, B, then adapters
            for part in ("delta",) if ct.endswith("svd") else ("lora_a", "lora_b"):
                for i in (i for i in idx if has_adapter(layer, f"a{i}")):
                    masks[(module, part, i)] = next(order).numpy().T  # torch (out, in) -> math (in, out)
    assert next(order, None) is None
    monkeypatch.setattr(weighted, "_keep_mask", lambda rng, path, part, i, shape, density:
                        jnp.asarray(masks[(path.replace("/", "."), part, i)].reshape(shape), bool))


def compare(env, idx, weights, ct, monkeypatch=None, unscaled=False, **kw):
    """PEFT's combined adapter vs jlora's: per-module delta and the logits; returns the largest differences."""
    import torch
    from test_hf_peft import torch_logits
    name = next(_names)
    spy = record_peft_masks(env, monkeypatch, name, ct, idx) if ct.startswith("dare") else iter([None, None])
    next(spy)
    torch.manual_seed(0)
    env.peft.add_weighted_adapter([f"a{i}" for i in idx], weights, adapter_name=name, combination_type=ct, **kw)
    next(spy, None)
    rng = jax.random.key(0) if ct.startswith("dare") else None
    lora, config = jlora.weighted_adapter([env.adapters[i] for i in idx], weights, env.model.params,
                                          combination_type=ct, model=env.model, rng=rng, **kw)
    plan = jlora.make_plan(env.model.params, config, lora=lora, model=env.model)
    pairs = jlora.tree.adapter_modules(lora)
    peft_targets = {n for n, m in env.modules.items() if has_adapter(m, name)}
    assert {t.torch_name for t in plan.values()} <= peft_targets
    worst = 0.0
    for target in plan.values():
        layer, pair = env.modules[target.torch_name], pairs[target.key_path[:-1]]
        mine = np.asarray(target.scale * target.delta(pair["lora_a"], pair["lora_b"]))
        theirs = layer.get_delta_weight(name).detach().numpy() / (layer.scaling[name] if unscaled else 1.0)
        theirs = theirs if target.kind == "embed" else theirs.T  # torch weights are Flax kernels transposed
        np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max(), err_msg=target.path)
        worst = max(worst, float(np.abs(mine - theirs).max() / np.abs(theirs).max()))
    if unscaled:
        return worst, None
    env.peft.set_adapter(name)
    inputs = env.case.inputs()
    expected = torch_logits(env.peft, inputs)
    got = np.asarray(jlora.apply(env.model, config)(env.model.params, lora, **inputs).logits)
    base = np.asarray(env.model(**inputs).logits)
    assert np.abs(expected - base).max() > 1e-3  # the combined adapter does something
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    return worst, float(np.abs(got - expected).max())


@pytest.mark.parametrize("ct", ["cat", *FACTOR, *SVD])
def test_llama_matches_peft(llama, ct, monkeypatch):
    kw = {"density": 0.6} if ct not in ("cat", "linear", "svd") else {}
    if "ties" in ct and ct != "ties_svd":
        kw["majority_sign_method"] = "frequency" if ct == "ties" else "total"
    compare(llama, [0, 1], [0.7, -0.4], ct, monkeypatch, **kw)


@pytest.mark.parametrize("ct,kw", [("cat", {}), ("svd", {"svd_rank": 3}), ("ties_svd", {"density": 0.5})])
def test_llama_mixed_ranks_three_adapters(llama, ct, kw):
    compare(llama, [0, 1, 2], [0.5, 0.3, -1.2], ct, **kw)


def test_llama_single_adapter_is_linear_as_in_peft(llama):
    compare(llama, [0], [-0.8], "svd", svd_rank=2)  # PEFT (and jlora) switch to "linear": svd_rank unused


def test_unequal_ranks_refused_for_factor_types_as_in_peft(llama):
    with pytest.raises(ValueError, match="same r value"):
        llama.peft.add_weighted_adapter(["a0", "a2"], [1.0, 1.0], adapter_name=next(_names), combination_type="linear")
    with pytest.raises(ValueError, match=r"needs equal ranks, but 'model/layers/0/self_attn/q_proj' has ranks "
                                         r"\{'adapters\[0\]': 4, 'adapters\[1\]': 2\}; use 'cat'"):
        jlora.weighted_adapter([llama.adapters[0], llama.adapters[2]], [1.0, 1.0], llama.model.params,
                               combination_type="linear")


def test_rslora_result_has_scale_one(llama):
    # PEFT 0.21.2 copies use_rslora into the combined config, scaling it by sqrt(r) (fixed upstream in
    # huggingface/peft#3449): its factors are right, so compare B @ A without PEFT's scaling.
    compare(llama, [3, 0], [1.0, 0.5], "svd", unscaled=True)
    compare(llama, [3, 0], [1.0, 0.5], "cat", unscaled=True)
    lora, config = jlora.weighted_adapter([llama.adapters[3]], [1.0], llama.model.params, combination_type="linear")
    assert not config.use_rslora and config.lora_alpha == config.r == 4


def test_svd_clamp_matches_peft_where_svd_signs_agree(llama):
    """The clamp quantile depends on each singular vector's sign (a LAPACK choice): the clamp bound is checked on
    every module, PEFT's clamped factors on the modules where torch's and jax's unclamped factors agree."""
    weights, plain, clamped = [0.7, -0.4], next(_names), next(_names)
    llama.peft.add_weighted_adapter(["a0", "a1"], weights, adapter_name=plain, combination_type="svd")
    llama.peft.add_weighted_adapter(["a0", "a1"], weights, adapter_name=clamped, combination_type="svd",
                                    svd_clamp=0.9)
    args = (llama.adapters[:2], weights, llama.model.params)
    ours_plain = jlora.tree.adapter_modules(jlora.weighted_adapter(*args, combination_type="svd")[0])
    ours = jlora.tree.adapter_modules(jlora.weighted_adapter(*args, combination_type="svd", svd_clamp=0.9)[0])
    agreed = 0
    for key, pair in ours.items():
        layer = llama.modules[".".join(key)]
        theirs = {n: (layer.lora_A[n].weight.detach().numpy().T, layer.lora_B[n].weight.detach().numpy().T)
                  for n in (plain, clamped)}
        mine_plain = tuple(np.asarray(ours_plain[key][k]) for k in ("lora_a", "lora_b"))
        mine = tuple(np.asarray(pair[k]) for k in ("lora_a", "lora_b"))
        bound = np.quantile(np.concatenate([mine_plain[1].ravel(), mine_plain[0].ravel()]), 0.9)
        assert max(np.abs(x).max() for x in mine) <= bound + 1e-7
        if all(np.allclose(x, y, atol=1e-5) for x, y in zip(mine_plain, theirs[plain])):
            agreed += 1
            for x, y in zip(mine, theirs[clamped]):
                np.testing.assert_allclose(x, y, atol=1e-5)
    if not agreed:
        pytest.skip("torch's and jax's SVD chose other signs for every module: the clamped factors differ by design")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return _env("gpt2", [dict(r=4, lora_alpha=8, target_modules=("c_fc", "c_proj", "wte")),
                         dict(r=4, lora_alpha=4, target_modules=("c_fc", "wte"))], tmp_path_factory)


def test_gpt2_conv1d_and_tied_embedding_match_peft(gpt2):
    env = gpt2
    for ct, kw in [("cat", {}), ("ties_svd", {"density": 0.5})]:
        compare(env, [0, 1], [0.7, -0.4], ct, **kw)
    # The factor types on a tied embedding: PEFT combines its head adapter (lora_A = lora_b) on its own, which
    # with weights of both signs puts the sign on the other factor; with equal signs both agree.
    compare(env, [0, 1], [0.7, 0.4], "ties", density=0.6)


def test_gpt2_fused_c_attn_is_refused():
    model = CASES["gpt2"].model()
    config = jlora.hf.default_config(model, r=4)  # c_attn with enable_lora (q, v slices)
    lora = _trained(model, config, seed=1)
    with pytest.raises(ValueError, match=r"adapters\[0\] adapts the fused projection 'transformer/h/0/attn/c_attn' "
                                         r"with enable_lora slices"):
        jlora.weighted_adapter([(lora, config)] * 2, [1.0, 1.0], model.params, combination_type="cat")


# --- properties on plain params trees (no PEFT) ---------------------------------------------
@st.composite
def two_adapters(draw):
    # a few shapes (plain, a scanned stack, DenseGeneral-like axes): every new shape costs XLA compiles
    stack, fan_in, fan_out = draw(st.sampled_from([((), (6,), (5,)), ((2,), (4,), (6,)), ((), (3, 2), (2, 2))]))
    ranks = draw(st.lists(st.integers(1, 2), min_size=2, max_size=2))  # cat's sum fits every kernel
    settings_ = [dict(lora_alpha=draw(st.sampled_from([1.0, 4.0, 16.0])), use_rslora=draw(st.booleans()))
                 for _ in ranks]
    weights = draw(st.lists(st.floats(-2, 2).filter(lambda w: abs(w) > 1e-3), min_size=2, max_size=2))
    return stack, fan_in, fan_out, ranks, settings_, weights, draw(st.integers(0, 2**16))


def build(stack, fan_in, fan_out, ranks, settings_, seed):
    params = {"blk": {"proj": {"kernel": jnp.zeros((*stack, *fan_in, *fan_out))}}}
    keys = jax.random.split(jax.random.key(seed), 2 * len(ranks))
    adapters = []
    for i, (r, s) in enumerate(zip(ranks, settings_)):
        lora = {"blk": {"proj": {"lora_a": jax.random.normal(keys[2 * i], (*stack, *fan_in, r)),
                                 "lora_b": jax.random.normal(keys[2 * i + 1], (*stack, r, *fan_out))}}}
        adapters.append((lora, jlora.LoraConfig(r=r, target_modules=("proj",), **s)))
    return params, adapters


def delta(params, lora, config):
    return np.asarray(jlora.merge(params, lora, config)["blk"]["proj"]["kernel"])  # params are zeros


@settings(max_examples=8, deadline=None)
@given(two_adapters())
def test_cat_and_full_rank_svd_give_the_weighted_sum(case):
    stack, fan_in, fan_out, ranks, settings_, weights, seed = case
    params, adapters = build(stack, fan_in, fan_out, ranks, settings_, seed)
    expected = sum(w * delta(params, *a) for w, a in zip(weights, adapters))
    tol = 1e-5 * max(1.0, np.abs(expected).max())
    lora, config = jlora.weighted_adapter(adapters, weights, params, combination_type="cat")
    assert config.lora_alpha == config.r == sum(ranks) and not config.use_rslora
    np.testing.assert_allclose(delta(params, lora, config), expected, atol=tol)
    full = min(sum(ranks), math.prod(fan_in), math.prod(fan_out))
    lora, config = jlora.weighted_adapter(adapters, weights, params, combination_type="svd", svd_rank=full)
    np.testing.assert_allclose(delta(params, lora, config), expected, atol=10 * tol)


@settings(max_examples=10, deadline=None)
@given(two_adapters(), st.sampled_from(["linear", "cat", "svd", "ties", "dare_ties_svd", "magnitude_prune"]))
def test_one_adapter_returns_its_weighted_delta(case, ct):
    stack, fan_in, fan_out, ranks, settings_, weights, seed = case
    params, adapters = build(stack, fan_in, fan_out, ranks[:1], settings_[:1], seed)
    kw = {"density": 0.5} if ct not in ("linear", "cat", "svd") else {}
    lora, config = jlora.weighted_adapter(adapters, weights[:1], params, combination_type=ct, **kw)
    expected = weights[0] * delta(params, *adapters[0])
    np.testing.assert_allclose(delta(params, lora, config), expected, atol=1e-5 * max(1.0, np.abs(expected).max()))


@settings(max_examples=6, deadline=None)
@given(two_adapters())
def test_density_one_prunes_nothing(case):
    stack, fan_in, fan_out, ranks, settings_, weights, seed = case
    params, adapters = build(stack, fan_in, fan_out, [ranks[0]] * 2, settings_, seed)
    run = lambda ct, **kw: jlora.weighted_adapter(adapters, weights, params, combination_type=ct,  # noqa: E731
                                                  rng=jax.random.key(1) if ct.startswith("dare") else None, **kw)[0]
    for pruned, plain in [("dare_linear", "linear"), ("dare_ties", "ties"), ("magnitude_prune_svd", "svd")]:
        kw = {"density": 1.0} if plain == "ties" else {}
        jax.tree_util.tree_map(np.testing.assert_array_equal, run(pruned, density=1.0), run(plain, **kw))


@settings(max_examples=12, deadline=None)
@given(st.integers(1, 5), st.integers(0, 2**16), st.floats(0.05, 1.0), st.sampled_from(["total", "frequency"]),
       st.lists(st.floats(-2, 2), min_size=1, max_size=3))
def test_merge_equals_peft_merge_utils(n, seed, density, method, weights):
    torch = pytest.importorskip("torch")
    from peft.utils import merge_utils
    tensors = np.random.default_rng(seed).normal(size=(len(weights), n + 2, 2 * n + 1)).astype(np.float32)
    as_torch = [torch.tensor(t) for t in tensors]
    w = torch.tensor(weights, dtype=torch.float32)
    ours = lambda kind: np.asarray(weighted._merge(kind, list(map(jnp.asarray, tensors)), weights, density,  # noqa
                                                   method, None))
    np.testing.assert_allclose(ours("ties"), merge_utils.ties(as_torch, w, density, method), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours("magnitude_prune"), merge_utils.magnitude_prune(as_torch, w, density),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours("linear"), merge_utils.task_arithmetic(as_torch, w), rtol=1e-5, atol=1e-6)


def test_dare_keeps_the_density_fraction_rescaled():
    params, adapters = build((), (64,), (48,), [8, 8], [dict(lora_alpha=8.0)] * 2, seed=0)
    lora, _ = jlora.weighted_adapter(adapters, [1.0, 0.0], params, combination_type="dare_linear", density=0.3,
                                     rng=jax.random.key(7))
    got, original = np.asarray(lora["blk"]["proj"]["lora_a"]), np.asarray(adapters[0][0]["blk"]["proj"]["lora_a"])
    kept = got != 0
    assert abs(kept.mean() - 0.3) < 0.05  # 512 draws: 3.5 standard deviations
    np.testing.assert_allclose(got[kept], original[kept] / 0.3, rtol=1e-6)  # sqrt(w * scale) = 1
    again, _ = jlora.weighted_adapter(adapters, [1.0, 0.0], params, combination_type="dare_linear", density=0.3,
                                      rng=jax.random.key(7))
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, lora)  # deterministic in rng


def test_union_of_targets_with_per_path_ranks():
    params = {name: {"kernel": jnp.zeros(shape)} for name, shape in [("a", (6, 5)), ("b", (5, 4)), ("c", (4, 3))]}
    config0 = jlora.LoraConfig(r=3, lora_alpha=6, target_modules=("a", "b"), rank_pattern={"b": 2})
    config1 = jlora.LoraConfig(r=3, lora_alpha=1, target_modules=("b", "c"), rank_pattern={"b": 2})
    adapters = [(jlora.init(jax.random.key(i), params, dataclasses.replace(c, init_lora_weights=False)), c)
                for i, c in enumerate((config0, config1))]
    lora, config = jlora.weighted_adapter(adapters, [1.0, 2.0], params, combination_type="linear")
    assert config.target_modules == ("a", "b", "c") and config.r == 3 and config.lora_alpha == 3
    assert dict(config.rank_pattern) == {"b": 2} and dict(config.alpha_pattern) == {"b": 2.0}
    merged = jlora.merge(params, lora, config)
    for name, i, w in [("a", 0, 1.0), ("c", 1, 2.0)]:  # one adapter there: exactly its weighted delta
        expected = w * np.asarray(jlora.merge(params, *adapters[i])[name]["kernel"])
        np.testing.assert_allclose(merged[name]["kernel"], expected, atol=1e-6)
    regex = (adapters[1][0], dataclasses.replace(config1, target_modules="b|c"))  # names and a regex: exact paths
    assert jlora.weighted_adapter([adapters[0], regex], [1.0, 2.0], params, combination_type="cat")[1].target_modules \
        == "a|b|c"
    both = [(a, dataclasses.replace(c, target_modules=t)) for (a, c), t in zip(adapters, ["a|b", "b|c"])]
    assert jlora.weighted_adapter(both, [1.0, 2.0], params, combination_type="cat")[1].target_modules == "(a|b)|(b|c)"


def test_bad_arguments_name_the_parameter():
    params, adapters = build((), (6,), (5,), [2, 2], [dict(lora_alpha=2.0)] * 2, seed=0)
    call = lambda **kw: jlora.weighted_adapter(**{"adapters": adapters, "weights": [1.0, 1.0], "params": params,  # noqa
                                                  **kw})
    cases = [
        (dict(combination_type="mean"), r"combination_type='mean' is unknown; expected one of \('cat', 'linear'"),
        (dict(weights=[1.0]), r"weights must hold one number per adapter \(2\)"),
        (dict(weights=[1.0, float("nan")]), r"weights\[1\] must be a finite real number, got nan"),
        (dict(combination_type="ties"), r"density=None: combination_type='ties' needs the fraction"),
        (dict(combination_type="svd", density=0.5), r"only the ties, dare and magnitude_prune types use it"),
        (dict(combination_type="ties", density=0.0), r"density=0.0: expected a fraction in \(0, 1\]"),
        (dict(combination_type="dare_linear", density=0.5), r"drops random entries; pass rng=jax.random.key"),
        (dict(combination_type="linear", svd_rank=2), r"svd_rank=2: expected a positive integer, and only with"),
        (dict(combination_type="svd", svd_rank=9), r"svd_rank 9 exceeds min\(fan_in, fan_out\) = 5 of 'blk/proj'"),
        (dict(combination_type="svd", svd_clamp=1.5), r"svd_clamp=1.5: expected a quantile in \[0, 1\]"),
        (dict(combination_type="ties", density=0.5, majority_sign_method="mean"), r"majority_sign_method='mean'"),
        (dict(adapters=[]), r"adapters must be a non-empty sequence of \(lora, config\) pairs"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            call(**kw)
    _, big = build((), (6,), (5,), [4, 4], [dict(lora_alpha=2.0)] * 2, seed=0)
    with pytest.raises(ValueError, match=r"'cat' gives 'blk/proj' rank 8, above min\(fan_in, fan_out\) = 5"):
        jlora.weighted_adapter(big, [1.0, 1.0], params, combination_type="cat")
    with_bias = ({"blk": {"proj": {**adapters[0][0]["blk"]["proj"], "bias": jnp.zeros(5)}}}, adapters[0][1])
    with pytest.raises(ValueError, match=r"adapters\[1\] holds leaves other than lora_a/lora_b, e.g. 'blk/proj/bias'"):
        jlora.weighted_adapter([adapters[0], with_bias], [1.0, 1.0], params, combination_type="cat")
