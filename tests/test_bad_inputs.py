"""What a hurried user passes: each gets a clear error naming what is wrong, or (numpy scalars,
models built from LoraDense) just works. Nothing is silently accepted."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from models import MLP, init_model

X = jnp.ones((2, 6))


def setup(r=2):
    params = init_model(MLP(), ((2, 6), jnp.float32))
    config = jlora.LoraConfig(r=r, lora_alpha=2 * r, target_modules=("fc1", "fc2"))
    return params, config, jlora.init(jax.random.key(0), params, config)


@pytest.mark.parametrize("alpha", [0, -4.0, 0.0])
def test_lora_alpha_must_be_positive(alpha):
    with pytest.raises(ValueError, match=r"LoraConfig.lora_alpha: expected a finite number > 0"):
        jlora.LoraConfig(r=4, lora_alpha=alpha, target_modules=("q",))


def test_numpy_scalars_are_numbers():
    config = jlora.LoraConfig(r=np.int64(4), lora_alpha=np.float32(16), lora_dropout=np.float64(0.1),
                              target_modules=("q",), rank_pattern={"q": np.int32(2)})
    assert config.r == 4 and type(config.r) is int and config.scale_for("a/q") == 8.0
    assert config == jlora.LoraConfig.from_dict(config.to_dict())
    hash(config)


@pytest.mark.parametrize("verb", ["init", "merge", "split", "count", "optimizer", "apply"])
@pytest.mark.parametrize("bad", [{"r": 2, "target_modules": ["fc1"]}, "peft"])
def test_config_of_the_wrong_type_is_named(verb, bad):
    params, config, lora = setup()
    if bad == "peft":
        from peft import LoraConfig as PeftLoraConfig
        bad = PeftLoraConfig(r=2, target_modules=["fc1"])
    calls = {"init": lambda: jlora.init(jax.random.key(0), params, bad),
             "merge": lambda: jlora.merge(params, lora, bad), "split": lambda: jlora.split(params, lora, bad),
             "count": lambda: jlora.count(params, lora, bad),
             "optimizer": lambda: jlora.optimizer(__import__("optax").sgd(1.0), bad),
             "apply": lambda: jlora.apply(MLP().apply, bad)}
    with pytest.raises(TypeError, match=rf"jlora.{verb}: config must be a jlora.LoraConfig, got "
                                        rf"(dict|LoraConfig) \((for a dict|this is PEFT's LoraConfig)"):
        calls[verb]()


def test_adapters_of_a_wider_model_name_the_module():
    params, config, _ = setup()
    wide = init_model(MLP(hidden=32), ((2, 6), jnp.float32))
    lora = jlora.init(jax.random.key(0), wide, config)
    with pytest.raises(ValueError, match=r"lora at 'fc1': lora_a \(6, 2\) and lora_b \(2, 32\) do not fit the kernel "
                                         r"\(6, 16\)"):
        jlora.apply(MLP().apply, config)(params, lora, X)
    with pytest.raises(ValueError, match=r"lora at 'fc1'.*do not fit"):
        jlora.merge(params, lora, config)


def test_bare_params_adapters_on_a_variables_dict_say_how_to_fix_it():
    params, config, lora = setup()
    with pytest.raises(ValueError, match=r"params is a linen variables dict .* but lora is not: its top keys are "
                                         r"\['fc1', 'fc2'\]. Wrap it as \{'params': lora\}"):
        jlora.apply(MLP().apply, config)(params, lora["params"], X)


def test_integer_adapters_and_empty_adapters_are_refused():
    params, config, lora = setup()
    ints = jax.tree_util.tree_map(lambda x: x.astype(jnp.int32), lora)
    with pytest.raises(TypeError, match=r"lora at 'fc1': lora_a has dtype int32; adapters must be floating point"):
        jlora.apply(MLP().apply, config)(params, ints, X)
    with pytest.raises(ValueError, match=r"jlora.apply: lora holds no adapters"):
        jlora.apply(MLP().apply, config)(params, {}, X)
    with pytest.raises(ValueError, match=r"jlora.merge: lora holds no adapters"):
        jlora.merge(params, {}, config)


@pytest.mark.parametrize("kwargs,message", [({"lora_dropout": 2.0}, r"LoraDense.lora_dropout: expected a rate"),
                                            ({"r": 0}, r"LoraDense.r: expected a positive integer rank"),
                                            ({"lora_alpha": 0.0}, r"LoraDense.lora_alpha: expected a number > 0")])
def test_lora_dense_checks_its_attributes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        jlora.LoraDense(4, **kwargs).init(jax.random.key(0), X)


@pytest.mark.parametrize("poison", [np.nan, np.inf])
def test_merge_refuses_non_finite_results_naming_the_module(poison):
    params, config, lora = setup()
    lora["params"]["fc2"]["lora_b"] = lora["params"]["fc2"]["lora_b"].at[0, 0].set(poison)
    with pytest.raises(ValueError, match=r"jlora.merge: folding the adapter into 'fc2' gives NaN or inf \(the adapter "
                                         r"holds non-finite values\); nothing was merged"):
        jlora.merge(params, lora, config)
    merged = jlora.merge(params, lora, config, check_finite=False)  # asked for explicitly
    assert not np.isfinite(np.asarray(merged["params"]["fc2"]["kernel"])).all()


class LoraMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(jlora.LoraDense(16, r=2, lora_alpha=4.0, name="fc1")(x))
        return nn.Dense(3, name="classifier")(x)


def test_apply_on_a_model_built_from_lora_dense():
    variables = LoraMLP().init(jax.random.key(0), X)
    params, lora = jlora.partition(variables)
    lora = jax.tree_util.tree_map(lambda a: a + 0.3, lora)
    config = jlora.LoraConfig(r=2, lora_alpha=4.0, target_modules=("fc1",))
    out = jlora.apply(LoraMLP().apply, config)(params, lora, X)
    np.testing.assert_allclose(out, LoraMLP().apply(jlora.combine(params, lora), X), rtol=1e-6)
    merged = jlora.merge(params, lora, config)
    zero = jax.tree_util.tree_map(jnp.zeros_like, lora)   # merged kernel, adapters off
    np.testing.assert_allclose(LoraMLP().apply(jlora.combine(merged, zero), X), out, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"LoraDense at 'fc1' has scale 2 .* but the config gives 4"):
        jlora.apply(LoraMLP().apply, jlora.LoraConfig(r=2, lora_alpha=8.0, target_modules=("fc1",)))(params, lora, X)


def test_count_is_peft_trainable_percent_over_params_only():
    model = nn.Sequential([nn.Dense(8), nn.BatchNorm(use_running_average=True)])
    variables = model.init(jax.random.key(0), X)
    assert "batch_stats" in variables
    config = jlora.LoraConfig(r=2, target_modules=("layers_0",))
    lora = jlora.init(jax.random.key(0), variables, config)
    counts = jlora.count(variables, lora, config)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(variables["params"]))
    assert counts.base == n_params and counts.adapter == 6 * 2 + 2 * 8
    assert counts.total == n_params + counts.adapter
    assert counts.trainable_fraction == counts.trainable / (n_params + counts.adapter)
    assert "all params: " in str(counts)


def test_adapters_and_config_must_agree_on_the_targets():
    params, config, lora = setup()
    only_fc1 = {"params": {"fc1": lora["params"]["fc1"]}}
    with pytest.raises(ValueError, match=r"jlora.apply: config.target_modules selects \['fc2'\] .* but lora holds no "
                                         r"adapter there"):
        jlora.apply(MLP().apply, config)(params, only_fc1, X)
    narrow = jlora.LoraConfig(r=2, lora_alpha=4, target_modules=("fc1",))
    with pytest.raises(ValueError, match=r"jlora.merge: lora holds adapters at \['fc2'\], which "
                                         r"config.target_modules \(\('fc1',\)\) does not select"):
        jlora.merge(params, lora, narrow)
    with pytest.raises(ValueError, match=r"jlora.split: params is a linen variables dict .* Wrap it as"):
        jlora.split(params, lora["params"], config)
    with pytest.raises(ValueError, match=r"lora has a top-level 'params' collection but params does not"):
        jlora.merge(params["params"], lora, config)


def test_peft_dotted_target_names_are_read_as_paths():
    params, _, _ = setup()
    config = jlora.LoraConfig(r=2, target_modules=("params.fc1",))
    assert set(jlora.init(jax.random.key(0), {"params": params}, config)["params"]["params"]) == {"fc1"}
    with pytest.raises(ValueError, match=r"'nope' matches no module .*a name matches the end of a '/'-joined module "
                                         r"path such as 'classifier'"):
        jlora.init(jax.random.key(0), params, jlora.LoraConfig(r=2, target_modules=("nope",)))
