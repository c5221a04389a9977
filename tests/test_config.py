"""LoraConfig: validation (one test per bad input) and path matching."""
import math

import jax
import jax.numpy as jnp
import pytest

import jlora
from models import MLP, TinyLM, init_model


@pytest.fixture(scope="module")
def mlp_params():
    return init_model(MLP(), ((2, 6), jnp.float32))


def test_rank_must_be_positive():
    with pytest.raises(ValueError, match=r"LoraConfig.r: expected a positive integer rank, got 0"):
        jlora.LoraConfig(r=0, target_modules=("q",))
    with pytest.raises(ValueError, match=r"LoraConfig.r"):
        jlora.LoraConfig(r=-2, target_modules=("q",))


def test_rank_larger_than_kernel(mlp_params):
    config = jlora.LoraConfig(r=7, target_modules=("fc1",))  # fc1 kernel is (6, 16)
    with pytest.raises(ValueError, match=r"LoraConfig.r: rank 7 exceeds min\(fan_in, fan_out\) = 6 of 'fc1'"):
        jlora.init(jax.random.key(0), mlp_params, config)


def test_rank_pattern_larger_than_kernel(mlp_params):
    config = jlora.LoraConfig(r=2, target_modules=("fc1", "classifier"), rank_pattern={"classifier": 4})
    with pytest.raises(ValueError, match=r"LoraConfig.rank_pattern: rank 4 exceeds .* = 3 of 'classifier'"):
        jlora.init(jax.random.key(0), mlp_params, config)


def test_target_that_matches_nothing_lists_names_seen(mlp_params):
    config = jlora.LoraConfig(target_modules=("fc1", "query"), r=2)
    with pytest.raises(ValueError, match=r"'query' matches no module holding a kernel; module names seen: "
                                         r"\['classifier', 'fc1', 'fc2'\]"):
        jlora.init(jax.random.key(0), mlp_params, config)


def test_regex_target_that_matches_nothing(mlp_params):
    config = jlora.LoraConfig(target_modules=r"fc\d/query", r=2)
    with pytest.raises(ValueError, match=r"regex 'fc\\\\d/query' fully matches no module path .* 'fc1'"):
        jlora.init(jax.random.key(0), mlp_params, config)


def test_rank_pattern_naming_nothing(mlp_params):
    config = jlora.LoraConfig(r=2, target_modules=("fc1",), rank_pattern={"fc9": 4})
    with pytest.raises(ValueError, match=r"LoraConfig.rank_pattern: pattern 'fc9' matches none"):
        jlora.init(jax.random.key(0), mlp_params, config)


def test_alpha_pattern_naming_nothing(mlp_params):
    config = jlora.LoraConfig(r=2, target_modules=("fc1",), alpha_pattern={"fc2": 4})
    with pytest.raises(ValueError, match=r"LoraConfig.alpha_pattern: pattern 'fc2' matches none of the "
                                         r"adapted modules \['fc1'\]"):
        jlora.init(jax.random.key(0), mlp_params, config)


def test_modules_to_save_naming_nothing(mlp_params):
    config = jlora.LoraConfig(r=2, target_modules=("fc1",), modules_to_save=("score",))
    with pytest.raises(ValueError, match=r"modules_to_save: 'score' matches no module"):
        jlora.init(jax.random.key(0), mlp_params, config)


@pytest.mark.parametrize("kwargs,message", [
    ({"target_modules": None}, r"target_modules: required"),
    ({"target_modules": ()}, r"target_modules: empty"),
    ({"target_modules": "fc(("}, r"not a valid regular expression"),
    ({"lora_dropout": 1.0}, r"lora_dropout: expected a rate in \[0, 1\)"),
    ({"bias": "some"}, r"LoraConfig.bias: expected one of \('none', 'all', 'lora_only'\)"),
    ({"init_lora_weights": "pissa"}, r"init_lora_weights: expected one of"),
    ({"lora_alpha": float("nan")}, r"lora_alpha: expected a finite number"),
    ({"modules_to_save": "classifier"}, r"modules_to_save: expected a sequence of module names"),
    ({"rank_pattern": {"fc1": 0}}, r"rank_pattern\['fc1'\]: must be > 0"),
    ({"rank_pattern": {"fc1": 2.5}}, r"rank_pattern\['fc1'\]: expected an integer, got 2.5"),
])
def test_bad_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        jlora.LoraConfig(**{"target_modules": ("q",), **kwargs})


def test_ambiguous_kernel_asks_for_the_model():
    model = TinyLM()
    params = init_model(model, ((1, 3), jnp.int32))
    config = jlora.LoraConfig(r=2, target_modules=("query",))
    with pytest.raises(ValueError, match=r"kernel at 'block_0/attn/query' has shape \(8, 2, 4\).*Pass the model.*"
                                         r"model=module.apply, inputs="):
        jlora.init(jax.random.key(0), params, config)
    ids = jnp.zeros((1, 3), jnp.int32)  # with the model at hand: no separate call
    lora = jlora.init(jax.random.key(0), params, config, model=model, inputs=(ids,))
    assert lora["params"]["block_0"]["attn"]["query"]["lora_b"].shape == (2, 2, 4)


def test_layout_that_does_not_fit_the_kernel():
    params = init_model(TinyLM(), ((1, 3), jnp.int32))
    config = jlora.LoraConfig(r=2, target_modules=("query",))
    bad = {f"block_{i}/attn/query": jlora.KernelLayout(stack_dims=0, in_dims=3) for i in range(2)}
    with pytest.raises(ValueError, match=r"layouts\['block_0/attn/query'\].*does not fit a kernel of shape"):
        jlora.init(jax.random.key(0), params, config, layouts=bad)


def test_suffix_matching_is_by_whole_components():
    config = jlora.LoraConfig(target_modules=("query", "self/value"))
    assert config.is_target("encoder/layer/0/attention/self/query")
    assert config.is_target("encoder/layer/0/attention/self/value")
    assert not config.is_target("encoder/layer/0/attention/other/value")
    assert not config.is_target("encoder/layer/0/attention/self/myquery")


def test_regex_target_matches_whole_path():
    config = jlora.LoraConfig(target_modules=r".*layer/[01]/.*query")
    assert config.is_target("layer/0/attention/query")
    assert not config.is_target("layer/2/attention/query")
    assert not config.is_target("x/layer/0/attention/query_bias")


def test_scale_rank_and_alpha_patterns():
    config = jlora.LoraConfig(r=8, lora_alpha=16, target_modules=("q", "v"),
                              rank_pattern={r"layer/0/q": 4}, alpha_pattern={"v": 2})
    assert config.rank_for("layer/0/q") == 4 and config.rank_for("layer/10/q") == 8
    assert config.scale_for("layer/0/q") == 16 / 4
    assert config.scale_for("layer/1/v") == 2 / 8
    rs = jlora.LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=("q",))
    assert rs.scale_for("q") == pytest.approx(8 / math.sqrt(16))


def test_config_is_hashable_and_round_trips():
    config = jlora.LoraConfig(r=4, target_modules=["q", "v"], rank_pattern={"q": 2}, modules_to_save=["head"])
    assert hash(config) == hash(jlora.LoraConfig.from_dict(config.to_dict()))
    assert config == jlora.LoraConfig.from_dict(config.to_dict())
    with pytest.raises(ValueError, match=r"unknown keys \['peft_type'\]"):
        jlora.LoraConfig.from_dict({**config.to_dict(), "peft_type": "LORA"})
