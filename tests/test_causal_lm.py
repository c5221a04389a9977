"""The causal-LM task's pieces (``jlora.app.causal_lm``) on a tiny random Llama with SmolLM2's real
tokenizer: the completion-only loss against a hand computation, packing, accumulation, remat and
bfloat16, the other families, and the PyTorch / PEFT round trips (the CLI: test_cli_causal_lm.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers as tf

import jlora
from jlora.app import causal_lm as clm
from jlora.app.sft_data import SftExample, encode
from jlora.hf.export import atomic_dir
from jlora.hf.llama import FlaxLlamaForCausalLMFixed
from jlora.hf.names import to_torch_state
from llm_cases import TINY, jlora_cli, tiny_llama_config, tiny_model, tokenizer  # noqa: F401 (fixtures)


def _setup(tiny_model):
    lm = clm.load_causal_lm(str(tiny_model), max_positions=256)
    config = jlora.hf.default_config(lm.model, r=4, lora_alpha=8)
    lora = jlora.init(jax.random.key(0), lm.params, config)
    lora = jax.tree_util.tree_map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape), lora)
    trainable, frozen = jlora.split(lm.params, lora, config)
    return lm, config, trainable, frozen, jlora.apply(lm.model, config)


def _examples(tokenizer, n=5):
    rows = [SftExample(f"Question {i}: what is {i} plus {i}?\nAnswer:", f" {2 * i}, of course", f"t:{i}")
            for i in range(n)]
    return [encode(tokenizer, e, 64) for e in rows]


def test_completion_only_loss_equals_a_hand_computation(tiny_model, tokenizer):
    lm, config, trainable, frozen, f = _setup(tiny_model)
    encoded = _examples(tokenizer, 3)
    batch = clm.rows(encoded, 64, packed=False, pad_id=2)
    loss = clm.make_loss(lm, f)(trainable, frozen, batch)
    # by hand: the adapted model's logits on each example alone, log-softmax, completion tokens only
    total, count = 0.0, 0
    for ids, weights in encoded:
        logits = f(frozen, trainable, ids[None]).logits[0].astype(jnp.float32)
        logp = jax.nn.log_softmax(logits[:-1])
        for t in range(len(ids) - 1):
            if weights[t + 1]:
                total, count = total - float(logp[t, ids[t + 1]]), count + 1
    assert count == sum(int(w.sum()) for _, w in encoded)  # completion + eos, nothing of the prompt
    np.testing.assert_allclose(float(loss), total / count, rtol=2e-5)
    plain = clm.make_loss(lm, f, fused=False)(trainable, frozen, batch)
    np.testing.assert_allclose(float(plain), float(loss), rtol=2e-5)


def test_packing_changes_no_loss_and_accumulation_no_gradient(tiny_model, tokenizer):
    lm, config, trainable, frozen, f = _setup(tiny_model)
    encoded = _examples(tokenizer, 6)
    loss_fn = clm.make_loss(lm, f)
    packed, single = clm.rows(encoded, 128, packed=True, pad_id=2), clm.rows(encoded, 128, packed=False, pad_id=2)
    assert len(packed["input_ids"]) < len(single["input_ids"])
    (lp, gp), (ls, gs) = (jax.value_and_grad(loss_fn)(trainable, frozen, b) for b in (packed, single))
    np.testing.assert_allclose(float(lp), float(ls), rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(gp), jax.tree_util.tree_leaves(gs)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)
    # accumulate=2 weighted by target tokens: the step of the whole batch
    tx = jlora.optimizer(optax.sgd(1.0), config)
    state = tx.init(trainable)
    one = jlora.make_train_step(loss_fn, tx, donate=False)(trainable, state, frozen, single)
    two = jlora.make_train_step(loss_fn, tx, donate=False, accumulate=2, weight_fn=clm.target_weight)(
        trainable, state, frozen, single)
    np.testing.assert_allclose(float(one[2]), float(two[2]), rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(one[0]), jax.tree_util.tree_leaves(two[0])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="does not split into 4 micro-batches"):
        jlora.make_train_step(loss_fn, tx, accumulate=4)(trainable, state, frozen, single)


def test_gpt2_trains_unpacked_and_refuses_packing(tmp_path, tokenizer):
    config = tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=49152, n_positions=256)  # > --seq-len
    model = tf.FlaxGPT2LMHeadModel(config, seed=0)
    folder = tmp_path / "gpt2"
    with atomic_dir(folder) as tmp:
        from safetensors.numpy import save_file
        save_file(to_torch_state({"transformer": model.params["transformer"]}), str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        config.to_json_file(str(tmp / "config.json"))
        tokenizer.save_pretrained(str(tmp))
    lm = clm.load_causal_lm(str(folder), max_positions=128)
    assert (lm.head_module, lm.head_transposed, lm.isolates_segments) == ("transformer/wte", True, False)
    cfg = jlora.hf.default_config(lm.model, r=4, lora_alpha=8)
    lora = jlora.init(jax.random.key(0), lm.params, cfg)
    trainable, frozen = jlora.split(lm.params, lora, cfg)
    batch = clm.rows(_examples(tokenizer, 2), 64, packed=False, pad_id=2)
    f = jlora.apply(lm.model, cfg)
    fused, plain = (clm.make_loss(lm, f, fused=x)(trainable, frozen, batch) for x in (True, False))
    np.testing.assert_allclose(float(fused), float(plain), rtol=2e-5)
    done = jlora_cli("finetune", *TINY, "--model", folder, "--out", tmp_path / "run")
    assert done.returncode == 2 and "Pass --no-pack" in done.stderr
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


def test_merged_export_generates_the_same_greedy_tokens_in_pytorch(tiny_model, tmp_path, tokenizer):
    torch = pytest.importorskip("torch")
    from jlora.generate import generate

    lm, config, trainable, frozen, f = _setup(tiny_model)
    out = jlora.hf.export_merged(tmp_path / "merged", lm.model, frozen, trainable, config, tokenizer=lm.tokenizer)
    prompt = np.asarray(tokenizer("The headline of the article is")["input_ids"], np.int32)[None]
    ours = np.asarray(generate(lm.model, frozen, prompt, lora=trainable, config=config, max_new_tokens=8))
    torch_model = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    theirs = torch_model.generate(torch.tensor(prompt, dtype=torch.long), max_new_tokens=8, do_sample=False,
                                  attention_mask=torch.ones(prompt.shape, dtype=torch.long)).numpy()[:, prompt.shape[1]:]
    np.testing.assert_array_equal(ours[:, :theirs.shape[1]], theirs)


def test_remat_and_bfloat16_options(tiny_model, tokenizer):
    batch = clm.rows(_examples(tokenizer, 4), 128, packed=True, pad_id=2)
    results = {}
    for name, kwargs in {"plain": {}, "remat": {"remat": True}, "bf16": {"dtype": "bfloat16"}}.items():
        lm = clm.load_causal_lm(str(tiny_model), max_positions=256, **kwargs)
        config = jlora.hf.default_config(lm.model, r=4, lora_alpha=8)
        lora = jax.tree_util.tree_map(lambda x: x + 0.05, jlora.init(jax.random.key(0), lm.params, config))
        trainable, frozen = jlora.split(lm.params, lora, config)
        step = jax.jit(jax.value_and_grad(clm.make_loss(lm, jlora.apply(lm.model, config))))
        results[name] = step(trainable, frozen, batch)
        if name == "remat":
            assert type(lm.model).__name__ == "FlaxLlamaForCausalLMRemat"
    (lp, gp), (lr, gr), (lb, gb) = results["plain"], results["remat"], results["bf16"]
    np.testing.assert_allclose(float(lr), float(lp), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(gr), jax.tree_util.tree_leaves(gp)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(float(lb), float(lp), rtol=2e-2)  # bfloat16 activations, float32 loss
    assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(gb))


@pytest.mark.parametrize("family", ["mistral", "gemma", "llama-untied"])
def test_other_families_load_and_their_fused_loss_equals_the_logits_loss(family, tmp_path, tokenizer):
    """HF folders of each supported decoder family: the head is found (tied or not) and the fused loss
    over the final hidden states equals the loss over the model's own logits."""
    small = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152, max_position_embeddings=128)
    config, cls = {
        "mistral": (tf.MistralConfig(sliding_window=128, **small), tf.FlaxMistralForCausalLM),
        "gemma": (tf.GemmaConfig(head_dim=8, hidden_activation="gelu_pytorch_tanh", **small), tf.FlaxGemmaForCausalLM),
        "llama-untied": (tiny_llama_config(tie_word_embeddings=False), FlaxLlamaForCausalLMFixed),
    }[family]
    model = cls(config, seed=0)
    folder = tmp_path / family
    with atomic_dir(folder) as tmp:
        from safetensors.numpy import save_file
        save_file(to_torch_state(model.params), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.to_json_file(str(tmp / "config.json"))
        tokenizer.save_pretrained(str(tmp))
    lm = clm.load_causal_lm(str(folder), max_positions=128)
    tied = bool(config.tie_word_embeddings)
    assert (lm.head_module == "lm_head") != tied and lm.head_transposed == tied
    cfg = jlora.hf.default_config(lm.model, r=4, lora_alpha=8)
    lora = jax.tree_util.tree_map(lambda x: x + 0.05, jlora.init(jax.random.key(0), lm.params, cfg))
    trainable, frozen = jlora.split(lm.params, lora, cfg)
    batch = clm.rows(_examples(tokenizer, 2), 64, packed=False, pad_id=2)
    f = jlora.apply(lm.model, cfg)
    fused, plain = (clm.make_loss(lm, f, fused=x)(trainable, frozen, batch) for x in (True, False))
    np.testing.assert_allclose(float(fused), float(plain), rtol=2e-5)


def test_peft_loads_the_run_adapter_with_the_same_logits(tiny_model, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    lm, config, trainable, frozen, f = _setup(tiny_model)
    zero = jax.tree_util.tree_map(np.zeros_like, trainable)
    base = jlora.hf.export_merged(tmp_path / "base", lm.model, frozen, zero, config, tokenizer=lm.tokenizer)
    adapter = jlora.hf.save_peft(tmp_path / "adapter", lm.model, trainable, config)
    model = peft.PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    ids = np.arange(5, 45, dtype=np.int32)[None]
    with torch.no_grad():
        theirs = model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    ours = np.asarray(f(frozen, trainable, ids).logits)
    np.testing.assert_allclose(theirs, ours, atol=1e-4)


def test_head_at_target_positions_only_gives_the_same_loss_and_gradients(tiny_model, tokenizer):
    lm, config, trainable, frozen, f = _setup(tiny_model)
    batch = clm.rows(_examples(tokenizer, 8), 256, packed=True, pad_id=2)
    cap = clm.targets_cap(batch, len(batch["input_ids"]))
    assert cap is not None and cap < batch["input_ids"].size // 2
    full, capped = (jax.value_and_grad(clm.make_loss(lm, f, targets_cap=c))(trainable, frozen, batch) for c in (None, cap))
    np.testing.assert_allclose(float(capped[0]), float(full[0]), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(capped[1]), jax.tree_util.tree_leaves(full[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
    text = {k: np.ones_like(v) if k == "weights" else v for k, v in batch.items()}  # every token a target
    assert clm.targets_cap(text, len(text["input_ids"])) is None
