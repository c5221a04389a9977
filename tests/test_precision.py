"""Mixed precision (jlora.precision, --dtype): what auto picks, and that every path takes the same
bf16 recipe: the frozen base stored in bfloat16, adapters / head / optimizer state float32, losses
float32 — the classify build, the causal-LM loader (QLoRA too), generate, the bank and the exports."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tf

import jlora
from jlora import precision
from jlora.app import causal_lm as clm
from jlora.app.finetune import FinetuneOptions, _loss_and_logits, build, make_optimizer
from jlora.app.sft_data import SftExample, encode
from jlora.hf.export import atomic_dir
from jlora.hf.names import to_torch_state
from llm_cases import tiny_llama_config, tiny_model, tokenizer  # noqa: F401 (fixtures)


def floats(tree):
    return [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


# --- what auto picks --------------------------------------------------------------------------

@pytest.mark.parametrize("speedup, picked", [(2.7, "bfloat16"), (1.5, "bfloat16"), (1.2, "float32"), (0.8, "float32")])
def test_auto_picks_bfloat16_only_where_its_matmul_is_clearly_faster(monkeypatch, speedup, picked):
    monkeypatch.setattr(precision, "matmul_speedup", lambda platform=None: speedup)
    assert precision.resolve_dtype("auto", platform="cpu") == picked
    assert f"{speedup:.2f}x" in precision.describe_choice("auto", picked, platform="cpu")


def test_accelerators_are_bfloat16_without_measuring(monkeypatch):
    monkeypatch.setattr(precision, "matmul_speedup", lambda platform=None: pytest.fail("measured on an accelerator"))
    for platform in ("gpu", "tpu"):
        assert precision.resolve_dtype("auto", platform=platform) == "bfloat16"
    assert precision.resolve_dtype("float32", platform="tpu") == "float32"


def test_the_probe_measures_something_real():
    speedup = precision.matmul_speedup("cpu", n=256, repeats=2)
    assert np.isfinite(speedup) and speedup > 0


@pytest.mark.parametrize("bad", ["bf16", "fp32", "", "float16"])
def test_a_bad_dtype_names_the_flag(bad):
    with pytest.raises(ValueError, match=r"--dtype: expected one of auto, bfloat16, float32, got"):
        precision.resolve_dtype(bad)
    with pytest.raises(ValueError, match=r"--dtype: expected one of"):
        FinetuneOptions(dtype=bad).resolved()


def test_cast_floats_leaves_integers_and_quantized_kernels_alone():
    params = {"layers": {"0": {"q": {"kernel": jnp.ones((64, 32)), "bias": jnp.ones(32)}}},
              "ids": jnp.arange(3), "norm": {"scale": jnp.ones(32)}}
    q = jlora.quantize(params, "nf4")
    cast = precision.cast_floats(q, jnp.bfloat16)
    assert cast["layers"]["0"]["q"]["kernel"] is q["layers"]["0"]["q"]["kernel"]
    assert cast["layers"]["0"]["q"]["bias"].dtype == cast["norm"]["scale"].dtype == jnp.bfloat16
    assert cast["ids"].dtype == jnp.int32
    with pytest.raises(ValueError, match="cast_floats: dtype must be a floating dtype"):
        precision.cast_floats(params, jnp.int8)


# --- the classify task's build ----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "bert"
    config = tf.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                           max_position_embeddings=64, vocab_size=30522)
    with atomic_dir(folder) as tmp:
        from safetensors.numpy import save_file
        save_file(to_torch_state({"bert": tf.FlaxBertModel(config, seed=0).params}), str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        config.to_json_file(str(tmp / "config.json"))
    return folder


@pytest.mark.parametrize("mode", ["lora", "head"])
def test_classify_in_bfloat16_trains_float32_over_a_bfloat16_base(tiny_bert, mode):
    from jlora.intercept import apply
    from jlora.train import make_train_step
    batch = {"input_ids": np.random.default_rng(0).integers(0, 30000, (4, 16)).astype(np.int32),
             "attention_mask": np.ones((4, 16), np.int32), "labels": np.array([0, 1, 2, 1], np.int32)}
    losses = {}
    for dtype in ("float32", "bfloat16"):
        options = FinetuneOptions(model=str(tiny_bert), mode=mode, dtype=dtype, steps=4).resolved()
        model, params, config, trainable, frozen = build(options, num_labels=3)
        f = apply(model, config) if config else None
        assert all(x.dtype == jnp.float32 for x in floats(trainable))
        assert all(x.dtype == jnp.dtype(dtype) for x in floats(frozen))
        tx = make_optimizer(options, config)
        step = make_train_step(lambda t, fz, b: _loss_and_logits(model, f, t, fz, b, None, False)[0], tx,
                               donate=False)
        trained, opt_state, loss = step(trainable, tx.init(trainable), frozen, batch)
        assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
        assert all(x.dtype == jnp.float32 for x in floats(trained) + floats(opt_state))
        losses[dtype] = float(loss)
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=2e-2)


# --- the causal-LM loader, QLoRA, generate, the bank and the exports ---------------------------

def _batch(tokenizer):
    rows = [encode(tokenizer, SftExample(f"Question {i}: what is {i} plus {i}?\nAnswer:", f" {2 * i}", f"t:{i}"), 64)
            for i in range(4)]
    return clm.rows(rows, 128, packed=True, pad_id=2)


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory, tokenizer):
    """A tiny tied Llama whose kernels' fan_in (64, 128) NF4's blocks of 64 divide."""
    from safetensors.numpy import save_file
    from jlora.hf.llama import FlaxLlamaForCausalLMFixed
    folder = tmp_path_factory.mktemp("tiny64") / "llama"
    config = tiny_llama_config(hidden_size=64, intermediate_size=128)
    with atomic_dir(folder) as tmp:
        save_file(to_torch_state(FlaxLlamaForCausalLMFixed(config, seed=0).params), str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        config.to_json_file(str(tmp / "config.json"))
        tokenizer.save_pretrained(str(tmp))
    return folder


@pytest.mark.parametrize("quantize", [None, "nf4", "int8"])
def test_causal_lm_loads_a_bfloat16_base_and_trains_float32_adapters(tiny64, tokenizer, quantize):
    batch, losses = _batch(tokenizer), {}
    for dtype in ("float32", "bfloat16"):
        lm = clm.load_causal_lm(str(tiny64), max_positions=256, dtype=dtype, quantize=quantize)
        assert lm.dtype == dtype and all(x.dtype == jnp.dtype(dtype) for x in floats(lm.params)
                                         if x.ndim < 2 or quantize is None)
        assert (sum(jlora.is_quantized(x) for x in jax.tree_util.tree_leaves(lm.params, is_leaf=jlora.is_quantized))
                > 0) == (quantize is not None)
        config = jlora.hf.default_config(lm.model, r=4, lora_alpha=8)
        lora = jax.tree_util.tree_map(lambda x: x + 0.05, jlora.init(jax.random.key(0), lm.params, config))
        trainable, frozen = jlora.split(lm.params, lora, config)
        loss, grads = jax.jit(jax.value_and_grad(clm.make_loss(lm, jlora.apply(lm.model, config))))(
            trainable, frozen, batch)
        assert loss.dtype == jnp.float32 and all(g.dtype == jnp.float32 for g in floats(grads))
        losses[dtype] = float(loss)
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=2e-2)


def test_generate_and_the_bank_take_the_bfloat16_base(tiny_model, tokenizer):
    lm = clm.load_causal_lm(str(tiny_model), max_positions=256, dtype="bfloat16")
    config = jlora.hf.default_config(lm.model, r=4, lora_alpha=8)
    adapters = []
    for seed in (1, 2):
        lora = jlora.init(jax.random.key(seed), lm.params, config)
        adapters.append((jax.tree_util.tree_map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(seed), x.shape),
                                                lora), config))
    prompt = np.asarray([tokenizer("The headline of the article is")["input_ids"]] * 2, np.int32)
    alone = [np.asarray(jlora.generate(lm.model, lm.params, prompt[:1], lora=lora, config=cfg, max_new_tokens=6))
             for lora, cfg in adapters]
    bank = jlora.bank.stack(adapters, lm.params, model=lm.model)
    mixed = np.asarray(jlora.generate(lm.model, lm.params, prompt, bank=bank, adapter_ids=np.array([1, 0]),
                                      max_new_tokens=6))
    np.testing.assert_array_equal(mixed[0], alone[1][0])
    np.testing.assert_array_equal(mixed[1], alone[0][0])


def test_exports_of_a_bfloat16_run_are_float32_with_the_delta_unrounded(tiny_model, tmp_path):
    from safetensors.numpy import load_file
    from jlora.app.lm_job import export_all
    lm = clm.load_causal_lm(str(tiny_model), max_positions=256, dtype="bfloat16")
    config = jlora.hf.default_config(lm.model, r=4, lora_alpha=8)
    lora = jlora.init(jax.random.key(0), lm.params, config)
    lora = jax.tree_util.tree_map(lambda x: x + 1e-3 * jax.random.normal(jax.random.key(1), x.shape), lora)
    trainable, frozen = jlora.split(lm.params, lora, config)
    export_all(tmp_path, dataclasses.replace(lm), frozen, trainable, config)
    state = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert {v.dtype for v in state.values()} == {np.dtype(np.float32)}
    a, b = (np.asarray(lora["model"]["layers"]["0"]["self_attn"]["q_proj"][k]) for k in ("lora_a", "lora_b"))
    base = np.asarray(frozen["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"], np.float32)
    expected = base + config.lora_alpha / config.r * a @ b  # torch layout: (out, in)
    np.testing.assert_allclose(state["model.layers.0.self_attn.q_proj.weight"], expected.T, rtol=1e-6, atol=1e-7)
    assert not np.allclose(state["model.layers.0.self_attn.q_proj.weight"], base.T)  # the delta is there
