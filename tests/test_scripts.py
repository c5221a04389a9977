"""Smoke tests: the examples and benchmarks run and write what they say (tiny settings)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PEFT_VENV = ROOT / ".venv-peft" / "bin" / "python"  # the benchmarks' PEFT side (benchmarks/setup-peft.sh)


def run(*args, timeout=600):
    done = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_tiny_finetune_example(tmp_path):
    out = run(ROOT / "examples" / "tiny_finetune.py", "--steps", "60", "--out", tmp_path / "run")
    final = [line for line in out.splitlines() if line.startswith("final:")]
    assert final, out[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["eval_accuracy"] > metrics["base_task2_accuracy"] + 0.2
    assert metrics["merge_max_abs_diff"] < 1e-4 and metrics["trainable_params"] < 0.05 * metrics["base_params"]


def test_compiled_memory_benchmark(tmp_path):
    out = run(ROOT / "benchmarks" / "compiled_memory.py", "--model", "big-kernel", "--out", tmp_path / "m.json")
    assert "| temp |" in out
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["lora"]["temp"] < result["full"]["temp"] / 4  # no 4096x4096 gradient in the LoRA step


def test_checkpoint_size_benchmark(tmp_path):
    out = run(ROOT / "benchmarks" / "checkpoint_size.py", "--out", tmp_path / "c.json")
    result = json.loads((tmp_path / "c.json").read_text())["results"]
    assert result["gpt2-medium"]["adapter_params"] == 24 * 2 * (1024 * 4 * 2)
    assert "gpt2-xl" in out


def test_causal_lm_example(tmp_path):
    out = run(ROOT / "examples" / "causal_lm.py", "--steps", "2", "--eval-chunks", "4", "--out", tmp_path / "clm")
    result = json.loads((tmp_path / "clm" / "result.json").read_text())
    assert result["perplexity_after"] < result["perplexity_before"]
    assert result["torch_matches_flax"] is True
    assert "held-out perplexity after 2 steps" in out and (tmp_path / "clm" / "merged" / "tokenizer.json").is_file()


def peft_python():
    """The PEFT side's interpreter for the two-process benchmarks: .venv-peft (benchmarks/setup-peft.sh) when it
    exists, else this interpreter if it has torch and peft (CI's lowest set), else the test is skipped."""
    if PEFT_VENV.exists():
        return PEFT_VENV
    if all(importlib.util.find_spec(name) is not None for name in ("torch", "peft")):
        return sys.executable
    pytest.skip(f"no PEFT interpreter: {PEFT_VENV} does not exist (bash benchmarks/setup-peft.sh) and this "
                "interpreter has no torch/peft")


def side_by_side(script, out, *args):
    """A benchmark's tiny run, the jlora side in this interpreter and the PEFT side in :func:`peft_python`."""
    return run(ROOT / "benchmarks" / script, *args, "--rounds", "2", "--steps", "1", "--pause", "0.05",
               "--peft-python", peft_python(), "--out", out)


def check_side_by_side(result, out, dtypes):
    """What every two-process run reports: both sides' machines, per-dtype ratios, the same step on both sides."""
    assert "jlora LoRA fp32 / PEFT LoRA fp32 step time" in out and "pause before each turn 0.05 s" in out
    machine = result["machine"]
    assert machine["jlora"]["versions"]["jax"] and machine["peft"]["versions"]["peft"]
    assert machine["jlora"]["cpu"]["model_name"] == machine["peft"]["cpu"]["model_name"]
    runs = result["runs"]
    assert all(r["step_s"] > 0 and len(r["round_s"]) == 2 for r in runs.values())
    assert result["ratios"]["jlora_lora:float32/peft_lora:float32"]["rounds"] == 2
    assert runs["peft_lora:float32"]["memory_after"]["tensors"]["total"] > 0
    assert runs["jlora_lora:float32"]["memory"]["temp"] > 0
    checks = {(e["jlora"], e["peft"]): e for e in result["equivalence"]}
    assert ("jlora_lora:float32", "peft_lora:float32") in checks
    for e in checks.values():
        assert e["jlora_trainable"] == e["torch_trainable"] > 0 and e["relative_diff"] <= e["rtol"]
    if "bfloat16" in dtypes:
        assert {"peft_lora:bfloat16-weights", "peft_lora:bfloat16-autocast"} <= set(runs)
        assert result["peft_bf16"] in runs
        assert runs["peft_lora:bfloat16-weights"]["weights_dtypes"] == ["torch.bfloat16", "torch.float32"]
        if "jlora_lora:bfloat16" in runs:  # the CLI's dtype option; else the reason is reported
            assert f"jlora_lora:bfloat16/{result['peft_bf16']}" in result["ratios"]
            assert runs["jlora_lora:bfloat16"]["of_matmul"]["median"] > 0  # against the bf16 matmul probe
        else:
            assert "bfloat16" in result["unsupported"]
    return runs


def test_compare_peft_runner_on_a_tiny_config(tmp_path):
    out = side_by_side("compare_peft.py", tmp_path, "--workload", "tiny", "--vocab", "512", "--rss")
    result = json.loads((tmp_path / "compare_peft_tiny.json").read_text())
    runs = check_side_by_side(result, out, ("float32", "bfloat16"))
    assert "jlora LoRA fp32 / jlora full fp32 step time" in out
    assert runs["peft_lora:float32"]["trainable"] == 2 * (64 * 8 + 8 * 192)  # r=8 on c_attn, 2 layers
    assert result["bytes"]["trainable"] == 4 * runs["peft_lora:float32"]["trainable"]
    for variant in ("jlora_lora:float32", "jlora_full:float32", "jlora_lora:bfloat16"):
        assert runs[variant]["memory"]["argument"] > 0
    assert set(runs) == {"jlora_lora:float32", "jlora_full:float32", "peft_lora:float32", "torch_full:float32",
                         "jlora_lora:bfloat16", "peft_lora:bfloat16-weights", "peft_lora:bfloat16-autocast"}
    rss = result["peak_rss_mib"]
    assert set(rss) == {"jlora_imports", "peft_imports", "jlora_lora", "jlora_full", "peft_lora", "torch_full"}
    assert all(rss[v] > rss[f"{'jlora' if v.startswith('jlora') else 'peft'}_imports"]
               for v in ("jlora_lora", "jlora_full", "peft_lora", "torch_full"))
    assert set(result["inference"]) == {"1x32", "2x64"}


def test_main_job_step_benchmark_on_a_tiny_bert(tmp_path):
    out = side_by_side("main_job_step.py", tmp_path, "--tiny")
    result = json.loads((tmp_path / "main_job_step.json").read_text())
    runs = check_side_by_side(result, out, ("float32", "bfloat16"))
    assert "| examples/s (median step) |" in out
    assert runs["jlora_lora:float32"]["trainable"] == 2 * 2 * (64 * 8 + 8 * 64) + 64 * 5 + 5  # q, v + classifier


def test_sft_step_benchmark_on_a_tiny_config(tmp_path):
    out = side_by_side("sft_step.py", tmp_path, "--tiny", "--dtype", "float32")
    result = json.loads((tmp_path / "sft_step.json").read_text())
    runs = check_side_by_side(result, out, ("float32",))
    assert "| tokens (non-padding)/s (median step) |" in out
    assert set(runs) == {"jlora_lora:float32", "peft_lora:float32"}
    same = result["equivalence"][0]  # the same step: both losses at the initial (lora_b = 0) adapter
    assert abs(same["jlora_loss0"] - same["torch_loss0"]) <= 1e-4 * same["torch_loss0"] and same["torch_loss0"] > 1
    assert runs["peft_lora:float32"]["packed_logits_max_abs_diff"] <= 2e-3
    q, v = 64 * 8 + 8 * 64, 64 * 8 + 8 * 32  # r=8 on q_proj (64 -> 64) and v_proj (64 -> 32: 2 kv heads of 16)
    assert runs["jlora_lora:float32"]["trainable"] == runs["peft_lora:float32"]["trainable"] == 2 * (q + v)
    assert runs["jlora_lora:float32"]["peak_bytes"] > 0


def test_adapter_bank_benchmark_quick(tmp_path):
    out = run(ROOT / "benchmarks" / "adapter_bank.py", "--quick", "--out", tmp_path)
    result = json.loads((tmp_path / "adapter_bank.json").read_text())
    assert "| tokens/s ratio a / b (> 1: a faster), per round |" in out and "| rows x tokens, N |" in out
    tiny = result["models"]["tiny"]
    for r in tiny["batches"].values():
        assert set(r["variants"]) == {"jlora_merged", "jlora_unmerged", "jlora_mixed8", "jlora_mixed64",
                                      "peft_merged", "peft_mixed8", "peft_mixed64"}
        assert all(v["tokens_per_s"]["median"] > 0 for v in r["variants"].values())
        checks = r["checks"]  # the same models: unmerged = merged, bank rows on adapter 0 = merged, PEFT = jlora
        assert checks["unmerged=merged"] == checks["mixed64 rows on adapter 0=merged"] == 1.0
        assert checks["peft_mixed64=jlora_mixed64"] == checks["peft_merged=jlora_merged"] == 1.0
    assert tiny["bytes"]["bank"] == 64 * tiny["bytes"]["adapter"]  # r=8 everywhere: no padding
    memory = tiny["sampler_memory"]
    assert memory["bank"]["argument"] - memory["merged"]["argument"] >= tiny["bytes"]["bank"]
    assert all(max(c["max_abs_diff_vs_gather"].values()) < 1e-3 for c in result["layer"]["cases"].values())
