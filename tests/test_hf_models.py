"""End to end for every HF family: wrap -> train -> merge -> export -> PyTorch transformers loads it."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from hf_cases import CASES


def loss_fn(case, logits, batch):
    if case.task == "cls":
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
    targets = batch["decoder_input_ids"] if case.task == "seq2seq" else batch["input_ids"]
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], targets[:, 1:]).mean()


def train(case, model, config, steps=4):
    lora = jlora.init(jax.random.key(0), model.params, config)
    trainable, frozen = jlora.split(model.params, lora, config)
    f = jlora.apply(model, config)
    tx = jlora.optimizer(optax.adam(3e-2), config)
    opt_state = tx.init(trainable)
    batch = {**case.inputs(batch=4), "labels": np.array([0, 1, 2, 1])}

    @jax.jit
    def step(trainable, opt_state, rng):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        loss, grads = jax.value_and_grad(
            lambda t: loss_fn(case, f(frozen, t, **inputs, dropout_rng=rng, train=True).logits, batch))(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    losses = []
    for i in range(steps):
        trainable, opt_state, loss = step(trainable, opt_state, jax.random.key(i))
        losses.append(float(loss))
    return trainable, frozen, losses


@pytest.mark.parametrize("name", sorted(CASES))
def test_identity_at_init(name):
    case = CASES[name]
    model = case.model()
    config = jlora.hf.default_config(model, r=4)
    lora = jlora.init(jax.random.key(0), model.params, config)
    inputs = case.inputs()
    np.testing.assert_array_equal(jlora.apply(model, config)(model.params, lora, **inputs).logits,
                                  model(**inputs).logits)


@pytest.mark.parametrize("name", sorted(CASES))
def test_train_merge_export_load_in_torch(name, tmp_path):
    torch = pytest.importorskip("torch")
    case = CASES[name]
    model = case.model()
    config = jlora.hf.default_config(model, r=4, lora_alpha=8)
    trainable, frozen, losses = train(case, model, config)
    assert losses[-1] < losses[0]
    inputs = case.inputs(seed=1)
    adapted = np.asarray(jlora.apply(model, config)(frozen, trainable, **inputs).logits)
    base = np.asarray(model(**inputs).logits)
    assert np.abs(adapted - base).max() > 1e-3  # training changed the function

    merged = jlora.merge(model.params, trainable, config)
    np.testing.assert_allclose(model(**inputs, params=merged).logits, adapted, rtol=1e-5, atol=1e-5)

    out = jlora.hf.export_merged(tmp_path / "merged", model, model.params, trainable, config)
    torch_model, info = case.torch_cls().from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        torch_logits = torch_model.eval()(**{k: torch.tensor(v, dtype=torch.long) for k, v in inputs.items()}).logits
    np.testing.assert_allclose(torch_logits.numpy(), adapted, rtol=1e-4, atol=1e-5)

    flax_again = case.flax_cls.from_pretrained(out, from_pt=True)
    np.testing.assert_allclose(flax_again(**inputs).logits, adapted, rtol=1e-5, atol=1e-5)


def test_gpt2_default_adapts_only_q_and_v_slices():
    case = CASES["gpt2"]
    model = case.model()
    config = jlora.hf.default_config(model, r=4)
    assert config.fan_in_fan_out is None and config.slices_for("transformer/h/0/attn/c_attn") == (True, False, True)
    lora = jlora.init(jax.random.key(0), model.params, config)
    pair = lora["transformer"]["h"]["0"]["attn"]["c_attn"]
    assert pair["lora_a"].shape == (2, 32, 4) and pair["lora_b"].shape == (2, 4, 32)
    pair["lora_b"] = jnp.ones_like(pair["lora_b"])
    merged = jlora.merge(model.params, lora, config)
    change = merged["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"] - \
        model.params["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]  # (3 * 32 out, 32 in)
    assert float(jnp.abs(change[:32]).min()) > 0 and float(jnp.abs(change[64:]).min()) > 0
    assert not jnp.any(change[32:64])  # W_k untouched


@pytest.mark.parametrize("with_model", [False, True])
def test_a_peft_users_gpt2_config_just_works(with_model):
    """PEFT's plain config on Conv1D layers (c_attn fused, c_proj square): no fan_in_fan_out needed."""
    case = CASES["gpt2"]
    model = case.model()
    config = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=("c_attn", "c_proj"))
    lora = jlora.init(jax.random.key(0), model.params, config, model=model if with_model else None)
    assert lora["transformer"]["h"]["0"]["attn"]["c_attn"]["lora_a"].shape == (32, 4)   # fan_in of (96, 32)
    assert lora["transformer"]["h"]["0"]["attn"]["c_attn"]["lora_b"].shape == (4, 96)
    plan = jlora.make_plan(model.params, config, model=model if with_model else None)
    assert plan["transformer/h/0/attn/c_proj"].layout.transposed  # square (32, 32): storage order derived
    assert plan["transformer/h/0/attn/c_proj"].layer == ("FlaxConv1D" if with_model else "(2-D kernel)")
    lora = jax.tree_util.tree_map(lambda x: x + 0.05, lora)
    inputs = case.inputs()
    adapted = jlora.apply(model, config)(model.params, lora, **inputs).logits
    merged = model(**inputs, params=jlora.merge(model.params, lora, config)).logits
    np.testing.assert_allclose(adapted, merged, rtol=1e-5, atol=1e-5)


def test_paper_settings_trainable_counts():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from paper_counts import SETTINGS, count_setting

    for name, layers, width, rank in (("GPT-2 Medium", 24, 1024, 4), ("GPT-2 Large", 36, 1280, 4),
                                      ("RoBERTa-base", 12, 768, 8)):
        config, flax_cls, r, _ = SETTINGS[name]
        counts = count_setting(config, flax_cls, r)
        assert counts.trainable == counts.adapter == layers * 2 * (width * rank + rank * width), name
        assert counts.checkpoint_bytes == 4 * counts.trainable


def test_lora_dropout_follows_dropout_rng_and_train():
    import transformers as tf
    case = CASES["bert"]
    model = tf.FlaxBertForSequenceClassification(
        tf.BertConfig(**{**case.config.to_dict(), "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}))
    config = jlora.hf.default_config(model, r=4, lora_dropout=0.5)
    lora = jax.tree_util.tree_map(lambda x: x + 0.1, jlora.init(jax.random.key(0), model.params, config))
    f = jlora.apply(model, config)
    inputs = case.inputs()
    evaluation = f(model.params, lora, **inputs).logits
    merged = model(**inputs, params=jlora.merge(model.params, lora, config)).logits
    np.testing.assert_allclose(evaluation, merged, rtol=1e-5, atol=1e-6)
    a = f(model.params, lora, **inputs, dropout_rng=jax.random.key(1), train=True).logits
    b = f(model.params, lora, **inputs, dropout_rng=jax.random.key(1), train=True).logits
    c = f(model.params, lora, **inputs, dropout_rng=jax.random.key(2), train=True).logits
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(evaluation)).max() > 1e-4
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-4


def test_export_for_the_wrong_model_writes_nothing(tmp_path):
    llama, gpt2 = CASES["llama"].model(), CASES["gpt2"].model()
    config = jlora.hf.default_config(llama, r=4)
    lora = jlora.init(jax.random.key(0), llama.params, config)
    with pytest.raises(ValueError, match=r"no kernel or embedding at 'model/layers/0/self_attn/q_proj' in params"):
        jlora.hf.export_merged(tmp_path / "out", gpt2, gpt2.params, lora, config)
    assert list(tmp_path.iterdir()) == []
