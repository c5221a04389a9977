"""A tied weight is one weight: an adapter on an embedding that the LM head reads adapts both uses,
and apply, merge, export_merged (PyTorch) and the PEFT export all compute the same function."""
import jax
import numpy as np
import pytest
import torch
import transformers as tf
from peft import PeftModel

import jlora
from hf_cases import CASES, DECODER
from jlora.hf.llama import FlaxLlamaForCausalLMFixed
from test_hf_peft import torch_base, torch_logits


def tied_llama():
    return FlaxLlamaForCausalLMFixed(tf.LlamaConfig(**DECODER, tie_word_embeddings=True), seed=0)


MODELS = {  # name: (flax model factory, embedding target, torch class)
    "gpt2": (CASES["gpt2"].model, "wte", tf.GPT2LMHeadModel),
    "llama-tied": (tied_llama, "embed_tokens", tf.LlamaForCausalLM),
    "gemma": (CASES["gemma"].model, "embed_tokens", tf.GemmaForCausalLM),
}


def adapted(name):
    factory, target, torch_cls = MODELS[name]
    model = factory()
    config = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=(target,))
    lora = jlora.init(jax.random.key(0), model.params, config)
    lora = jax.tree_util.tree_map(lambda x: x + 0.2 * jax.random.normal(jax.random.key(1), x.shape), lora)
    return model, config, lora, torch_cls


@pytest.mark.parametrize("name", sorted(MODELS))
def test_apply_merge_torch_and_peft_agree_on_a_tied_embedding(name, tmp_path):
    model, config, lora, torch_cls = adapted(name)
    assert model.config.tie_word_embeddings
    plan = jlora.make_plan(model.params, config, model=model)
    (target,) = plan.values()
    assert target.kind == "embed" and target.tied_heads, "the plan records the head that reads the table"
    inputs = CASES["gpt2"].inputs(batch=2, length=7)
    base = np.asarray(model(**inputs).logits)
    ours = np.asarray(jlora.apply(model, config)(model.params, lora, **inputs).logits)
    merged = np.asarray(model(**inputs, params=jlora.merge(model.params, lora, config)).logits)
    scale = np.abs(ours).max()
    assert np.abs(ours - base).max() > 1e-2 * scale  # the adapter acts
    np.testing.assert_allclose(ours, merged, rtol=1e-5, atol=1e-5 * scale)

    jlora.hf.export_merged(tmp_path / "merged", model, model.params, lora, config)
    exported = torch_cls.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(torch_logits(exported, inputs), ours, rtol=1e-4, atol=1e-4 * scale)
    assert (torch_logits(exported, inputs).argmax(-1) == ours.argmax(-1)).mean() == 1.0

    jlora.hf.save_peft(tmp_path / "adapter", model, lora, config)
    peft_model = PeftModel.from_pretrained(torch_base_for(model, torch_cls, tmp_path / "base"),
                                           tmp_path / "adapter").eval()
    np.testing.assert_allclose(torch_logits(peft_model, inputs), ours, rtol=1e-4, atol=1e-4 * scale)
    back, back_config = jlora.hf.load_peft(tmp_path / "adapter", model)
    np.testing.assert_allclose(jlora.apply(model, back_config)(model.params, back, **inputs).logits, ours,
                               rtol=1e-5, atol=1e-5 * scale)


def torch_base_for(model, torch_cls, folder):
    class Case:  # torch_base wants an object with torch_cls()
        @staticmethod
        def torch_cls():
            return torch_cls
    return torch_base(Case, model, folder)


def test_a_head_adapter_that_is_not_the_embeddings_twin_is_refused(tmp_path):
    from safetensors.numpy import load_file, save_file
    model, config, lora, _ = adapted("gpt2")
    jlora.hf.save_peft(tmp_path / "adapter", model, lora, config)
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors["base_model.model.lm_head.lora_A.weight"] += 1.0
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"adapter on the tied head 'lm_head' differs from its embedding's"):
        jlora.hf.load_peft(tmp_path / "adapter", model)


def test_an_untied_head_is_not_mistaken_for_a_tied_one():
    """Untied Llama, adapter on embed_tokens, lm_head trained in full (modules_to_save): the head's
    kernel has the table's transposed shape but is a weight of its own; only the lookup is adapted."""
    model = CASES["llama"].model()
    assert not model.config.tie_word_embeddings
    config = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=("embed_tokens",), modules_to_save=("lm_head",))
    lora = jax.tree_util.tree_map(lambda x: x + 0.2, jlora.init(jax.random.key(0), model.params, config))
    trainable, frozen = jlora.split(model.params, lora, config)
    assert jlora.make_plan(model.params, config, model=model)["model/embed_tokens"].tied_heads == ()
    inputs = CASES["llama"].inputs()
    ours = jlora.apply(model, config)(frozen, trainable, **inputs).logits
    merged = model(**inputs, params=jlora.merge(model.params, trainable, config)).logits
    np.testing.assert_allclose(ours, merged, rtol=1e-5, atol=1e-5)


def test_a_peft_adapter_on_the_lookup_only_of_a_tied_embedding_is_refused(tmp_path):
    """PEFT without ensure_weight_tying adapts only GPT-2's token lookup: jlora cannot express that
    with one tied weight, so it refuses instead of computing other logits (383 off, measured)."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    model = CASES["gpt2"].model()
    base = torch_base(CASES["gpt2"], model, tmp_path / "base")
    peft_model = get_peft_model(base, PeftLoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "wte"],
                                                     init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"the adapter on 'transformer.wte' adapts an embedding that this "
                                         r"FlaxGPT2LMHeadModel's head reads too .* no adapter on the head \['lm_head'\]"):
        jlora.hf.load_peft(tmp_path / "adapter", model)
