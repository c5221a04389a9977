"""Smoke tests: the examples and benchmarks run and write what they say (tiny settings)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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


def test_compare_peft_runner_on_a_tiny_config(tmp_path):
    out = run(ROOT / "benchmarks" / "compare_peft.py", "--workload", "tiny", "--steps", "2", "--vocab", "512",
              "--rss", "--out", tmp_path)
    result = json.loads((tmp_path / "compare_peft_tiny.json").read_text())
    assert "ratios: jlora-LoRA / PEFT-LoRA" in out
    assert result["torch"]["peft_lora"]["trainable"] == 2 * (64 * 8 + 8 * 192)  # r=8 on c_attn, 2 layers
    assert result["jax"]["bytes"]["trainable"] == 4 * result["torch"]["peft_lora"]["trainable"]
    for variant in ("jlora_lora", "jlora_full"):
        assert result["jax"][variant]["step_s"] > 0 and result["jax"][variant]["memory"]["argument"] > 0
    rss = result["peak_rss_mib"]
    assert set(rss) == {"none", "jlora_lora", "jlora_full", "peft_lora", "torch_full"}
    assert all(rss[v] > rss["none"] for v in ("jlora_lora", "jlora_full", "peft_lora", "torch_full"))


def test_main_job_step_benchmark_on_a_tiny_bert(tmp_path):
    out = run(ROOT / "benchmarks" / "main_job_step.py", "--tiny", "--rounds", "2", "--steps", "1", "--out", tmp_path)
    result = json.loads((tmp_path / "main_job_step.json").read_text())
    assert "jlora / PEFT step time" in out
    assert result["jlora_lora"]["step_s"] > 0 and result["peft_lora"]["step_s"] > 0
    ratio = result["alternation"]["ratios"]["jlora_lora/peft_lora"]
    assert ratio["rounds"] == 2 and ratio["median"] > 0
    assert result["jlora_lora"]["trainable"] == result["peft_lora"]["trainable"] > 0


def test_sft_step_benchmark_on_a_tiny_config(tmp_path):
    out = run(ROOT / "benchmarks" / "sft_step.py", "--tiny", "--rounds", "1", "--steps", "1", "--out", tmp_path)
    result = json.loads((tmp_path / "sft_step.json").read_text())
    assert "jlora / PEFT step time" in out and "| tokens/s (non-padding, median step) |" in out
    assert result["jlora_lora"]["step_s"] > 0 and result["peft_lora"]["step_s"] > 0
    same = result["equivalence"]  # the same step: both losses at the initial (lora_b = 0) adapter
    assert abs(same["jlora_loss"] - same["torch_loss"]) <= 1e-4 * same["torch_loss"] and same["torch_loss"] > 1
    assert same["packed_logits_max_abs_diff"] <= 2e-3
    q, v = 64 * 8 + 8 * 64, 64 * 8 + 8 * 32  # r=8 on q_proj (64 -> 64) and v_proj (64 -> 32: 2 kv heads of 16)
    assert result["jlora_lora"]["trainable"] == result["peft_lora"]["trainable"] == 2 * (q + v)
    assert result["jlora_lora"]["peak_bytes"] > 0 and result["peft_lora"]["peak_bytes"] > 0


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
