"""Merged exports load in transformers 5 (PyTorch) too, in a separate install made by the test.

transformers 5 has no Flax models, so it cannot share an environment with the Flax side: it is
installed with ``pip install --target`` into a cache folder and run in a subprocess with that
folder first on ``PYTHONPATH`` (torch and safetensors come from the test environment).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import jlora
from hf_cases import CASES

TRANSFORMERS_5 = "transformers==5.24.0"
LOADER = r"""
import json, sys
import numpy as np, torch, transformers
assert transformers.__version__.startswith("5."), transformers.__version__
report = {}
for job in json.load(open(sys.argv[1])):
    model, info = getattr(transformers, job["cls"]).from_pretrained(job["dir"], output_loading_info=True)
    inputs = {k: torch.tensor(np.load(v), dtype=torch.long) for k, v in job["inputs"].items()}
    with torch.no_grad():
        logits = model.eval()(**inputs).logits.numpy()
    report[job["name"]] = {"missing": list(info["missing_keys"]), "unexpected": list(info["unexpected_keys"]),
                           "max_diff": float(np.abs(logits - np.load(job["expected"])).max()),
                           "version": transformers.__version__}
    if "greedy" in job:  # greedy continuation of the inputs, to compare with jlora's KV-cache sampler
        ids = inputs["input_ids"]
        new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        report[job["name"]]["greedy"] = new[:, ids.shape[1]:].tolist()
        report[job["name"]]["greedy_equal"] = report[job["name"]]["greedy"] == np.load(job["greedy"]).tolist()
print(json.dumps(report))
"""


@pytest.fixture(scope="session")
def transformers5(tmp_path_factory):
    target = Path(os.environ.get("JLORA_TRANSFORMERS5_DIR", tmp_path_factory.mktemp("transformers5")))
    if not (target / "transformers").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(target), TRANSFORMERS_5],
                       check=True)
    return target


def test_exports_load_in_transformers_5(transformers5, tmp_path):
    jobs = []
    for name, case in sorted(CASES.items()):
        model = case.model()
        config = jlora.hf.default_config(model, r=4)
        lora = jax.tree_util.tree_map(lambda x: x + 0.02, jlora.init(jax.random.key(0), model.params, config))
        inputs = case.inputs()
        expected = np.asarray(jlora.apply(model, config)(model.params, lora, **inputs).logits)
        out = jlora.hf.export_merged(tmp_path / name, model, model.params, lora, config)
        saved = {}
        for key, value in inputs.items():
            np.save(tmp_path / f"{name}_{key}.npy", value)
            saved[key] = str(tmp_path / f"{name}_{key}.npy")
        np.save(tmp_path / f"{name}_expected.npy", expected)
        jobs.append({"name": name, "cls": case.torch_name, "dir": str(out), "inputs": saved,
                     "expected": str(tmp_path / f"{name}_expected.npy")})
    jobs.append(_sft_llama_job(tmp_path))
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(transformers5), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", LOADER, str(tmp_path / "jobs.json")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    print(json.dumps(report, indent=1))
    assert sorted(report) == sorted([*CASES, "sft_llama"])
    assert report["sft_llama"]["greedy_equal"], report["sft_llama"]
    for name, result in report.items():
        assert not result["missing"] and not result["unexpected"], (name, result)
        assert result["max_diff"] < 1e-4, (name, result)


def _sft_llama_job(tmp_path: Path) -> dict:
    """What ``jlora finetune --task causal-lm`` exports for a GGUF-born model: the tied Llama with
    rope_theta 1e5 (``FlaxLlamaForCausalLMFixed``), merged; transformers 5 must give its logits and
    the greedy tokens of jlora's sampler."""
    import transformers as tf
    from jlora.hf.llama import FlaxLlamaForCausalLMFixed

    config = tf.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, rope_theta=100000.0,
                            tie_word_embeddings=True, initializer_range=0.2)
    model = FlaxLlamaForCausalLMFixed(config, seed=0)
    lora_config = jlora.hf.default_config(model, r=4)
    lora = jax.tree_util.tree_map(lambda x: x + 0.05, jlora.init(jax.random.key(0), model.params, lora_config))
    ids = np.random.default_rng(0).integers(3, 90, (2, 6)).astype(np.int32)
    expected = np.asarray(jlora.apply(model, lora_config)(model.params, lora, ids).logits)
    greedy = np.asarray(jlora.generate(model, model.params, ids, lora=lora, config=lora_config, max_new_tokens=8))
    out = jlora.hf.export_merged(tmp_path / "sft_llama", model, model.params, lora, lora_config)
    for name, value in (("ids", ids), ("expected", expected), ("greedy", greedy)):
        np.save(tmp_path / f"sft_llama_{name}.npy", value)
    return {"name": "sft_llama", "cls": "LlamaForCausalLM", "dir": str(out),
            "inputs": {"input_ids": str(tmp_path / "sft_llama_ids.npy")},
            "expected": str(tmp_path / "sft_llama_expected.npy"), "greedy": str(tmp_path / "sft_llama_greedy.npy")}


PLAIN_FLAX_UNDER_5 = r"""
import jax, jax.numpy as jnp, flax.linen as nn, transformers, jlora
assert transformers.__version__.startswith("5."), transformers.__version__
model = nn.Dense(3)
params = model.init(jax.random.key(0), jnp.ones((2, 4)))
config = jlora.LoraConfig(r=2, target_modules=r".*")
lora = jax.tree_util.tree_map(lambda x: x + 0.1, jlora.init(jax.random.key(1), params, config))
out = jlora.apply(model.apply, config)(params, lora, jnp.ones((2, 4)))
want = model.apply(jlora.merge(params, lora, config), jnp.ones((2, 4)))
assert jnp.allclose(out, want, atol=1e-5), (out, want)
print("ok", transformers.__version__)
"""


def test_apply_works_on_plain_flax_with_transformers_5_imported(transformers5):
    """transformers 5 has no FlaxPreTrainedModel: jlora must not assume the attribute exists."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(transformers5), str(Path(jlora.__file__).parents[1])])}
    done = subprocess.run([sys.executable, "-c", PLAIN_FLAX_UNDER_5], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok 5."), done.stdout
