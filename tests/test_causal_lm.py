"""The causal-LM task (``jlora finetune --task causal-lm``) on a tiny random Llama with SmolLM2's real
tokenizer and the real shipped BBC headline data: the loss math, packing, accumulation, the CLI end to
end, resume, exports and bad input."""
import json
import os
import signal
import subprocess
import sys

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
from jlora.hf.llama import FlaxLlamaForCausalLMFixed, read_gguf_tokenizer
from jlora.hf.names import to_torch_state

TINY = ["--task", "causal-lm", "--batch", "2", "--max-length", "64", "--seq-len", "128", "--eval-examples", "4",
        "--gen-examples", "2", "--max-new-tokens", "4", "--no-progress"]


def tiny_llama_config(**overrides):
    settings = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=49152, max_position_embeddings=256, rope_theta=100000.0,
                    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    settings.update(overrides)
    return tf.LlamaConfig(**settings)


@pytest.fixture(scope="module")
def tokenizer():
    return read_gguf_tokenizer(jlora.hf.smollm2_gguf_path())


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer):
    """A random 2-layer tied Llama with SmolLM2's tokenizer, as an HF folder with PyTorch-named weights."""
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    config = tiny_llama_config()
    model = FlaxLlamaForCausalLMFixed(config, seed=0)
    with atomic_dir(folder) as tmp:
        from safetensors.numpy import save_file
        save_file(to_torch_state(model.params), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.to_json_file(str(tmp / "config.json"))
        tokenizer.save_pretrained(str(tmp))
    return folder


def jlora_cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "jlora.app.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


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


def test_finetune_causal_lm_end_to_end(tiny_model, tmp_path):
    out = tmp_path / "run"
    done = jlora_cli("finetune", *TINY, "--model", tiny_model, "--out", out, "--steps", "4", "--eval-every", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    final = json.loads((out / "final.json").read_text())
    assert final["step"] == 4 and final["eval_perplexity"] < final["perplexity_before"]
    assert 0.0 <= final["eval_rouge_l"] <= 1.0 and "rouge_l_before" in final
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4] and rows[1]["tokens_per_s"] > 0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and {"reference", "generated", "generated_before", "origin"} <= set(samples[0])
    assert samples[0]["origin"].endswith(".txt:1")  # a real BBC article
    for name in ("metrics.png", "merged/model.safetensors", "merged/tokenizer.json", "adapter/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    # the merged export loads in transformers' Flax Llama and scores the held-out rows as the run did
    merged = tf.FlaxLlamaForCausalLM.from_pretrained(out / "merged", from_pt=True)
    assert merged.config.tie_word_embeddings and merged.config.rope_theta == 100000.0
    exported = jlora_cli("export", "--run", out, "--format", "peft", "--dest", tmp_path / "peft")
    assert exported.returncode == 0 and "exported step 3" in exported.stdout, exported.stderr[-3000:]


def test_ctrl_c_and_resume_give_the_uninterrupted_losses(tiny_model, tmp_path):
    flags = [*TINY, "--model", tiny_model, "--no-export", "--steps", "6", "--eval-every", "2", "--gen-examples", "0",
             "--accumulate", "2"]
    straight = jlora_cli("finetune", "--out", tmp_path / "straight", *flags)
    assert straight.returncode == 0, straight.stderr[-3000:]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "jlora.app.cli", "finetune", "--out", str(tmp_path / "cut"),
                             *map(str, flags)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step 2:"):
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130 and "checkpoint saved" in rest, "".join(seen) + rest
    resumed = jlora_cli("finetune", "--out", tmp_path / "cut", "--resume", *flags)
    assert resumed.returncode == 0 and "resumed from step" in resumed.stdout, resumed.stderr[-3000:]

    def losses(run):
        return {r["step"]: r.get("loss") for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert losses(tmp_path / "cut") == losses(tmp_path / "straight")


def test_bad_input_is_named(tiny_model, tmp_path):
    bert = tmp_path / "bert"
    bert.mkdir()
    tf.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4, intermediate_size=64).to_json_file(
        str(bert / "config.json"))
    done = jlora_cli("finetune", *TINY, "--model", bert, "--out", tmp_path / "r1")
    assert done.returncode == 2 and "'bert' model; the causal-LM task supports llama, mistral, gemma, gpt2" in done.stderr
    done = jlora_cli("finetune", *TINY, "--model", tiny_model, "--out", tmp_path / "r2", "--max-length", "512")
    assert done.returncode == 2 and "--max-length 512 is longer than --seq-len 128" in done.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    done = jlora_cli("finetune", *TINY, "--model", tiny_model, "--data", bad, "--out", tmp_path / "r3")
    assert done.returncode == 2 and "bad.jsonl:2: expected keys" in done.stderr
    done = jlora_cli("finetune", *TINY, "--model", tmp_path / "nope.gguf", "--out", tmp_path / "r4")
    assert done.returncode == 2 and "no such GGUF file" in done.stderr
    assert not (tmp_path / "r1").exists() or not any((tmp_path / "r1").iterdir())


def test_gpt2_trains_unpacked_and_refuses_packing(tmp_path, tokenizer):
    config = tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=49152, n_positions=128)
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


def test_gguf_model_in_merged_gguf_out(tmp_path):
    """A Llama GGUF file (tiny, random, SmolLM2's tokenizer fields) fine-tuned from the CLI: the merged
    GGUF it writes reads back through jlora's loader with the logits of the merged HF export."""
    from jlora.hf.gguf_export import export_gguf
    from jlora.hf.llama import read_gguf_llama

    model = FlaxLlamaForCausalLMFixed(tiny_llama_config(), seed=0)
    source = export_gguf(tmp_path / "tiny.gguf", model, model.params, None, None,
                         source_gguf=jlora.hf.smollm2_gguf_path())
    out = tmp_path / "run"
    done = jlora_cli("finetune", *TINY, "--model", source, "--out", out, "--steps", "2", "--eval-every", "2",
                     "--gen-examples", "0")
    assert done.returncode == 0, done.stderr[-3000:]
    config, params = read_gguf_llama(out / "merged.gguf")
    assert config.tie_word_embeddings and config.rope_theta == 100000.0
    hf = FlaxLlamaForCausalLMFixed.from_pretrained(out / "merged", from_pt=True)
    ids = np.arange(3, 40, dtype=np.int32)[None]
    from_gguf = FlaxLlamaForCausalLMFixed(config, _do_init=False)(ids, params=params).logits
    from_hf = hf(ids, params={k: v for k, v in hf.params.items() if k != "lm_head"}).logits
    np.testing.assert_allclose(np.asarray(from_gguf), np.asarray(from_hf), atol=1e-5)
    base = FlaxLlamaForCausalLMFixed(config, _do_init=False)(ids, params=read_gguf_llama(source)[1]).logits
    assert np.abs(np.asarray(base) - np.asarray(from_gguf)).max() > 1e-4  # the adapter was folded in


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


def _losses(run):
    return [r.get("loss") for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


MESH_FLAGS = [*TINY, "--batch", "8", "--steps", "3", "--eval-every", "3", "--gen-examples", "0", "--no-export"]


@pytest.mark.parametrize("mesh", ["data=2,fsdp=4", "data=2,tensor=4"])
def test_fsdp_and_tensor_parallel_meshes_give_the_losses_of_one_device(tiny_model, tmp_path, mesh):
    single = jlora_cli("finetune", *MESH_FLAGS, "--model", tiny_model, "--out", tmp_path / "one")
    sharded = jlora_cli("finetune", *MESH_FLAGS, "--model", tiny_model, "--out", tmp_path / "mesh", "--mesh", mesh)
    assert single.returncode == 0 and sharded.returncode == 0, single.stderr[-2000:] + sharded.stderr[-2000:]
    assert f"mesh {dict(parse(mesh))}" in sharded.stdout
    np.testing.assert_allclose(np.array(_losses(tmp_path / "mesh")[1:], float),
                               np.array(_losses(tmp_path / "one")[1:], float), rtol=2e-5)


def parse(mesh):
    from jlora.app.pods import parse_mesh
    return parse_mesh(mesh).items()


def test_two_processes_give_the_losses_of_one(tiny_model, tmp_path):
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent / "workers"))
    from launch import run_workers

    single = jlora_cli("finetune", *MESH_FLAGS, "--model", tiny_model, "--out", tmp_path / "one")
    assert single.returncode == 0, single.stderr[-2000:]
    flags = [*MESH_FLAGS[:-1], "--model", tiny_model, "--out", tmp_path / "two", "--mesh", "data=2,fsdp=2"]
    logs = run_workers(Path(__file__).parent / "workers" / "cli_worker.py", *flags, timeout=600)
    assert "over 2 process(es)" in logs[0]
    np.testing.assert_allclose(np.array(_losses(tmp_path / "two")[1:], float),
                               np.array(_losses(tmp_path / "one")[1:], float), rtol=2e-5)
    assert (tmp_path / "two" / "merged" / "model.safetensors").is_file()  # exported once, from gathered adapters


def test_mesh_flag_is_checked():
    from jlora.app.pods import parse_mesh
    assert parse_mesh("4") == {"data": 4} and parse_mesh("data=2, fsdp=4") == {"data": 2, "fsdp": 4}
    for bad, message in [("data=2,model=4", "AXIS one of"), ("data=0", "positive integer"), ("data=2,data=2", "twice"),
                         ("fsdp", "AXIS=SIZE")]:
        with pytest.raises(ValueError, match=message):
            parse_mesh(bad)


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
