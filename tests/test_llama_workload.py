"""benchmarks/llama_workload.py: the Flax Llama equals transformers' PyTorch Llama, jlora's adapters
equal PEFT's, and compare_peft.py runs the llama code path (the GPU recipe's) on a tiny config."""
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import llama_workload as lw  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
SPEC = lw.LLAMA_WORKLOADS["llama-tiny"]
IDS = np.random.default_rng(0).integers(0, SPEC["vocab"], (2, 24))


def random_params(model, scale=0.1):
    """Weights far from init (norm weights around 1), so that a wrong transpose or rotation shows."""
    params = model.init(jax.random.key(0), jnp.asarray(IDS, jnp.int32))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    new = [(1.0 if path[-1].key == "weight" else 0.0) + scale * jax.random.normal(k, x.shape, x.dtype)
           for k, (path, x) in zip(keys, leaves)]
    return jax.tree_util.tree_unflatten(treedef, new)


def torch_model(params):
    model = transformers.LlamaForCausalLM(lw.torch_llama_config(SPEC)).eval()
    model.load_state_dict({k: torch.tensor(v) for k, v in lw.to_torch_state_dict(params).items()}, strict=True)
    return model


@pytest.mark.parametrize("remat", [False, True])
def test_flax_llama_logits_equal_transformers(remat):
    model = lw.make_model(dict(SPEC, remat=remat))
    params = random_params(model)
    logits = np.asarray(jax.jit(model.apply)(params, jnp.asarray(IDS, jnp.int32)))
    tmodel = torch_model(params)
    assert tmodel.config._attn_implementation == "sdpa"
    with torch.no_grad():
        expected = tmodel(torch.tensor(IDS)).logits.numpy()
    assert np.abs(expected).max() > 1.0
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)


def test_jlora_adapters_equal_peft_and_count():
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    model = lw.make_model(SPEC)
    params = random_params(model)
    ids = jnp.asarray(IDS, jnp.int32)
    config, lora = lw.lora_setup(model, params, ids)
    lora = jax.tree_util.tree_map(lambda x: x + 0.05, lora)  # non-zero lora_b
    adapted = np.asarray(jax.jit(jlora.apply(model.apply, config))(params, lora, ids))
    peft_model = get_peft_model(torch_model(params), LoraConfig(r=lw.RANK, lora_alpha=lw.ALPHA,
                                                                target_modules=list(lw.TARGETS))).eval()
    state = {}
    for proj in lw.TARGETS:
        pair = lora["params"]["layers"][proj]
        for i in range(SPEC["layers"]):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            state[f"{prefix}.lora_A.weight"] = torch.tensor(np.asarray(pair["lora_a"][i]).T.copy())
            state[f"{prefix}.lora_B.weight"] = torch.tensor(np.asarray(pair["lora_b"][i]).T.copy())
    assert not set_peft_model_state_dict(peft_model, state).unexpected_keys
    with torch.no_grad():
        expected = peft_model(torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(adapted, expected, atol=1e-4, rtol=1e-4)
    n_lora = sum(x.size for x in jax.tree_util.tree_leaves(lora))
    assert n_lora == lw.param_counts(SPEC)["lora"] == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_param_counts_and_flops_formula():
    counts = lw.param_counts(lw.LLAMA_WORKLOADS["llama-1b"])
    assert counts["total"] == 1_100_048_384  # TinyLlama-1.1B
    model = lw.make_model(SPEC)
    params = model.init(jax.random.key(0), jnp.asarray(IDS, jnp.int32))
    assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == lw.param_counts(SPEC)["total"]
    tokens = SPEC["batch"] * SPEC["seq"]
    full, lora = lw.model_flops_per_step(SPEC, "jlora_full"), lw.model_flops_per_step(SPEC, "peft_lora")
    assert full - lora == 2 * lw.param_counts(SPEC)["matmul"] * tokens - 6 * lw.param_counts(SPEC)["lora"] * tokens
    assert lw.mfu(989e12, 1.0, lw.peak_flops("NVIDIA H100 80GB HBM3", jnp.bfloat16)) == pytest.approx(1.0)
    assert lw.peak_flops("cpu", jnp.bfloat16) is None and lw.mfu(1e9, 1.0, None) is None


def test_xla_flops_count_every_scanned_layer():
    one, three = (lw.xla_step_flops(dict(SPEC, layers=n), "float32", "jlora_full") for n in (1, 3))
    direct = lw._xla_flops(lw.lower_abstract(dict(SPEC, layers=3), "float32", "jlora_full", unroll=True).compile())
    assert three == pytest.approx(direct, rel=0.02) and three > 2 * one  # within 2% of the compiled, unrolled step


def test_runner_llama_tiny(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare_peft.py"), "--workload", "llama-tiny",
                           "--steps", "2", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| MFU (analytic) |" in done.stdout and "ratios: jlora-LoRA / PEFT-LoRA" in done.stdout
    result = json.loads((tmp_path / "compare_peft_llama-tiny.json").read_text())
    rows = {**{v: result["jax"][v] for v in ("jlora_lora", "jlora_full")},
            **{v: result["torch"][v] for v in ("peft_lora", "torch_full")}}
    for name, r in rows.items():
        assert r["step_s"] > 0 and r["model_flops"] > 0 and "mfu_analytic" in r, name
    for name in ("jlora_lora", "jlora_full"):
        assert rows[name]["xla_flops"] > 0 and "mfu_xla" in rows[name] and rows[name]["memory"]["argument"] > 0
    assert result["torch"]["peft_lora"]["trainable"] == lw.param_counts(SPEC)["lora"]
    assert result["jax"]["bytes"]["trainable"] == 4 * lw.param_counts(SPEC)["lora"]  # float32 adapters
    assert abs(result["jax"]["jlora_lora"]["loss"] - np.log(SPEC["vocab"])) < 0.5  # random init: ~log(vocab)
