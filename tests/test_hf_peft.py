"""PEFT adapters both ways (peft.PeftModel on PyTorch), and the errors of bad adapter folders."""
import json
import os

import jax
import numpy as np
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig, PeftModel, get_peft_model
from safetensors.numpy import load_file, save_file

import jlora
from hf_cases import CASES
from jlora.hf.export import atomic_dir
from jlora.hf.names import to_torch_state


def torch_base(case, model, folder):
    """The PyTorch model with the Flax model's (random) weights."""
    with atomic_dir(folder) as tmp:
        save_file(to_torch_state(model.params), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.to_json_file(str(tmp / "config.json"))
    return case.torch_cls().from_pretrained(folder).eval()


def torch_logits(model, inputs):
    with torch.no_grad():
        return model(**{k: torch.tensor(v, dtype=torch.long) for k, v in inputs.items()}).logits.numpy()


def trained_lora(model, config, seed=3):
    lora = jlora.init(jax.random.key(0), model.params, config)
    leaves, tree = jax.tree_util.tree_flatten(lora)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


@pytest.mark.parametrize("name,overrides", [
    ("gpt2", {}),  # fused c_attn with q,v slices -> one block-diagonal PEFT adapter
    ("gpt2", {"target_modules": ("c_attn", "c_fc", "wte"), "use_rslora": True}),
    ("llama", {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 4}}),
    ("bert", {"bias": "lora_only"}),
])
def test_save_peft_loads_in_peft_and_back(name, overrides, tmp_path):
    case = CASES[name]
    model = case.model()
    config = jlora.hf.default_config(model, r=4, lora_alpha=8, **overrides)
    trainable, frozen = jlora.split(model.params, trained_lora(model, config), config)
    if config.bias != "none" or config.modules_to_save:
        trainable = jax.tree_util.tree_map(lambda x: x + 0.01, trainable)
    inputs = case.inputs()
    expected = np.asarray(jlora.apply(model, config)(frozen, trainable, **inputs).logits)

    jlora.hf.save_peft(tmp_path / "adapter", model, trainable, config)
    peft_model = PeftModel.from_pretrained(torch_base(case, model, tmp_path / "base"), tmp_path / "adapter").eval()
    np.testing.assert_allclose(torch_logits(peft_model, inputs), expected, rtol=1e-4, atol=1e-5)

    lora, loaded_config = jlora.hf.load_peft(tmp_path / "adapter", model)
    np.testing.assert_allclose(jlora.apply(model, loaded_config)(model.params, lora, **inputs).logits, expected,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,targets", [("gpt2", ["c_attn", "c_proj"]), ("llama", ["q_proj", "v_proj", "o_proj"])])
def test_load_peft_made_by_peft(name, targets, tmp_path):
    case = CASES[name]
    model = case.model()
    base = torch_base(case, model, tmp_path / "base")
    peft_model = get_peft_model(base, PeftLoraConfig(r=4, lora_alpha=16, target_modules=targets,
                                                     fan_in_fan_out=name == "gpt2", init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    inputs = case.inputs()
    expected = torch_logits(peft_model.eval(), inputs)
    lora, config = jlora.hf.load_peft(tmp_path / "adapter", model)
    assert config.r == 4 and config.lora_alpha == 16 and config.fan_in_fan_out is None  # storage order derived
    adapted = np.asarray(jlora.apply(model, config)(model.params, lora, **inputs).logits)
    np.testing.assert_allclose(adapted, expected, rtol=1e-4, atol=1e-5)
    assert np.abs(adapted - np.asarray(model(**inputs).logits)).max() > 1e-3
    merged = jlora.merge(model.params, lora, config)
    np.testing.assert_allclose(model(**inputs, params=merged).logits, expected, rtol=1e-4, atol=1e-5)


@pytest.fixture()
def llama_adapter(tmp_path):
    model = CASES["llama"].model()
    config = jlora.hf.default_config(model, r=4)
    jlora.hf.save_peft(tmp_path / "adapter", model, trained_lora(model, config), config)
    return model, tmp_path / "adapter"


def rewrite(folder, change):
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def test_adapter_for_another_model(llama_adapter):
    _, folder = llama_adapter
    with pytest.raises(ValueError, match=r"key 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' "
                                         r"names module .* which this FlaxGPT2LMHeadModel does not have"):
        jlora.hf.load_peft(folder, CASES["gpt2"].model())


def test_adapter_with_a_missing_key(llama_adapter):
    model, folder = llama_adapter
    rewrite(folder, lambda t: t.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"))
    with pytest.raises(ValueError, match=r"module 'model.layers.1.self_attn.v_proj' lacks lora_B"):
        jlora.hf.load_peft(folder, model)


def test_adapter_with_wrong_shapes(llama_adapter):
    model, folder = llama_adapter
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    rewrite(folder, lambda t: t.__setitem__(key, np.zeros((4, 30), np.float32)))
    with pytest.raises(ValueError, match=r"wrong shapes for 'model.layers.0.self_attn.q_proj': lora_A \(4, 30\)"):
        jlora.hf.load_peft(folder, model)


def test_adapter_folder_without_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no adapter_config.json"):
        jlora.hf.load_peft(tmp_path, CASES["llama"].model())


def test_unsupported_peft_feature(llama_adapter):
    model, folder = llama_adapter
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match=r"use_dora=True is not supported"):
        jlora.hf.load_peft(folder, model)


def test_saving_adapters_for_the_wrong_model_writes_nothing(tmp_path):
    llama = CASES["llama"].model()
    config = jlora.hf.default_config(llama, r=4)
    lora = trained_lora(llama, config)
    with pytest.raises(ValueError, match=r"no kernel or embedding at 'model/layers/0/self_attn/q_proj' in params; the "
                                         r"adapter tree does not belong to these params"):
        jlora.hf.save_peft(tmp_path / "adapter", CASES["gpt2"].model(), lora, config)
    assert os.listdir(tmp_path) == []  # no partial folder left behind


def test_export_refuses_an_existing_folder_and_leaves_it_intact(tmp_path):
    model = CASES["llama"].model()
    config = jlora.hf.default_config(model, r=4)
    lora = trained_lora(model, config)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"out_dir .*out' exists; pass overwrite=True"):
        jlora.hf.export_merged(tmp_path / "out", model, model.params, lora, config)
    assert os.listdir(tmp_path / "out") == ["keep.txt"]
    jlora.hf.export_merged(tmp_path / "out", model, model.params, lora, config, overwrite=True)
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_adapters_that_changed_the_base_are_refused(init, tmp_path):
    case = CASES["llama"]
    model = case.model()
    base = torch_base(case, model, tmp_path / "base")
    peft_model = get_peft_model(base, PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                     init_lora_weights=init))
    peft_model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match=rf"init_lora_weights='{init}' made this adapter together with a changed "
                                         r"base model"):
        jlora.hf.load_peft(tmp_path / "adapter", model)
