"""``jlora finetune --task causal-lm`` from the command line, end to end, on a tiny random Llama with
SmolLM2's real tokenizer and the real shipped BBC headline data: the run folder, exports, Ctrl-C and
resume, bad input, a GGUF model in and a merged GGUF out, named meshes and 2 processes."""
import json
import re
import sys

import numpy as np
import pytest
import transformers as tf

import jlora
from jlora.hf.llama import FlaxLlamaForCausalLMFixed
from cli_runs import check_ctrl_c_then_resume, jlora_cli
from llm_cases import TINY, tiny_llama_config, tiny_model, tokenizer  # noqa: F401 (fixtures)


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
    assert merged.config.max_position_embeddings == 256  # the model's own, not the run's cap (--seq-len 128)
    exported = jlora_cli("export", "--run", out, "--format", "peft", "--dest", tmp_path / "peft")
    assert exported.returncode == 0 and "after step 4 (checkpoints/3)" in exported.stdout, exported.stderr[-3000:]


def test_ctrl_c_and_resume_give_the_uninterrupted_losses(tiny_model, tmp_path):
    flags = [*TINY, "--model", tiny_model, "--no-export", "--steps", "6", "--eval-every", "2", "--gen-examples", "0",
             "--accumulate", "2"]
    check_ctrl_c_then_resume(flags, tmp_path, "step 2:")


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
    (tmp_path / "fake.gguf").write_text("not a gguf file")
    done = jlora_cli("finetune", *TINY, "--model", tmp_path / "fake.gguf", "--out", tmp_path / "r5")
    assert done.returncode == 2 and "fake.gguf is not a Llama GGUF file jlora can read" in done.stderr
    assert not any((tmp_path / f"r{i}").exists() for i in range(1, 6))  # refused before the run folder is made


@pytest.mark.parametrize("flags, message", [
    (["--eval-examples", "0"], "--eval-examples 0: the causal-lm task scores the held-out perplexity of at least one"),
    (["--lr", "nan"], "--lr: expected a finite number > 0, got nan"),
    (["--lr", "-1"], "--lr: expected a finite number > 0, got -1.0"),
    (["--alpha", "0"], "--alpha: expected a finite number > 0, got 0.0"),
    (["--eval-fraction", "1.5"], "--eval-fraction: expected a number in (0, 1), got 1.5"),
    (["--out", "FILE"], "--out FILE is a file, not a folder"),
])
def test_bad_flags_are_refused_before_the_model_loads(tmp_path, capsys, flags, message):
    from jlora.app.cli import main
    (tmp_path / "notes.txt").write_text("keep")
    flags = [f.replace("FILE", str(tmp_path / "notes.txt")) for f in flags]
    assert main(["finetune", *TINY, "--model", str(tmp_path / "none.gguf"), "--out", str(tmp_path / "run"),
                 *flags]) == 2
    assert message.replace("FILE", str(tmp_path / "notes.txt")) in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "keep" and not (tmp_path / "run").exists()


def test_a_run_refused_after_loading_leaves_no_run_folder(tiny_model, tmp_path, capsys):
    from jlora.app.cli import main
    out = tmp_path / "run"
    for flags, message in ((["--targets", "q_projj"], "'q_projj' matches no module"),
                           (["--rank", "100000"], "rank 100000 exceeds"),
                           (["--mesh", "data=3"], "--batch 2: it must split")):
        assert main(["finetune", *TINY, "--model", str(tiny_model), "--out", str(out), *flags]) == 2
        assert message in capsys.readouterr().err and not out.exists()
        out.mkdir()
        (out / "notes.txt").write_text("keep")  # with --overwrite the old run stays until the new one can start
        assert main(["finetune", *TINY, "--model", str(tiny_model), "--out", str(out), "--overwrite", *flags]) == 2
        assert message in capsys.readouterr().err and (out / "notes.txt").read_text() == "keep"
        (out / "notes.txt").unlink()
        out.rmdir()


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
    assert config.tie_word_embeddings and config.rope_theta == 100000.0 and config.max_position_embeddings == 256
    hf = FlaxLlamaForCausalLMFixed.from_pretrained(out / "merged", from_pt=True)
    ids = np.arange(3, 40, dtype=np.int32)[None]
    from_gguf = FlaxLlamaForCausalLMFixed(config, _do_init=False)(ids, params=params).logits
    from_hf = hf(ids, params={k: v for k, v in hf.params.items() if k != "lm_head"}).logits
    np.testing.assert_allclose(np.asarray(from_gguf), np.asarray(from_hf), atol=1e-5)
    base = FlaxLlamaForCausalLMFixed(config, _do_init=False)(ids, params=read_gguf_llama(source)[1]).logits
    assert np.abs(np.asarray(base) - np.asarray(from_gguf)).max() > 1e-4  # the adapter was folded in


def _losses(run):
    return [r.get("loss") for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


MESH_FLAGS = [*TINY, "--batch", "8", "--steps", "3", "--eval-every", "3", "--gen-examples", "0", "--no-export"]


@pytest.fixture(scope="module")
def one_device_losses(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    single = jlora_cli("finetune", *MESH_FLAGS, "--model", tiny_model, "--out", out)
    assert single.returncode == 0, single.stderr[-2000:]
    return np.array(_losses(out)[1:], float)


@pytest.mark.parametrize("mesh", ["data=2,fsdp=4", "data=2,tensor=4"])
def test_fsdp_and_tensor_parallel_meshes_give_the_losses_of_one_device(tiny_model, tmp_path, mesh, one_device_losses):
    sharded = jlora_cli("finetune", *MESH_FLAGS, "--model", tiny_model, "--out", tmp_path / "mesh", "--mesh", mesh)
    assert sharded.returncode == 0, sharded.stderr[-2000:]
    assert f"mesh {dict(parse(mesh))}" in sharded.stdout
    np.testing.assert_allclose(np.array(_losses(tmp_path / "mesh")[1:], float), one_device_losses, rtol=2e-5)


def parse(mesh):
    from jlora.app.pods import parse_mesh
    return parse_mesh(mesh).items()


def test_two_processes_give_the_losses_of_one(tiny_model, tmp_path, one_device_losses):
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent / "workers"))
    from launch import run_workers

    flags = [*MESH_FLAGS[:-1], "--model", tiny_model, "--out", tmp_path / "two", "--mesh", "data=2,fsdp=2"]
    logs = run_workers(Path(__file__).parent / "workers" / "cli_worker.py", *flags, timeout=600)
    assert "over 2 process(es)" in logs[0]
    np.testing.assert_allclose(np.array(_losses(tmp_path / "two")[1:], float), one_device_losses, rtol=2e-5)
    assert (tmp_path / "two" / "merged" / "model.safetensors").is_file()  # exported once, from gathered adapters


def test_mesh_flag_is_checked():
    from jlora.app.pods import parse_mesh
    assert parse_mesh("4") == {"data": 4} and parse_mesh("data=2, fsdp=4") == {"data": 2, "fsdp": 4}
    for bad, message in [("data=2,model=4", "AXIS one of"), ("data=0", "positive integer"), ("data=2,data=2", "twice"),
                         ("fsdp", "AXIS=SIZE")]:
        with pytest.raises(ValueError, match=message):
            parse_mesh(bad)


def test_qlora_run_end_to_end(tokenizer, tmp_path):
    """``--quantize nf4``: the run trains adapters over an NF4 base; the merged export (float) and the
    PEFT adapter over the NF4 base give the same logits; a block size that does not divide a kernel
    is named before any run folder is made."""
    from jlora.hf.export import atomic_dir
    from jlora.hf.names import to_torch_state
    from jlora.hf.peft import load_peft
    from safetensors.numpy import save_file

    folder = tmp_path / "llama64"  # width 64: NF4's blocks of 64 divide every kernel
    config = tiny_llama_config(hidden_size=64, intermediate_size=128)
    source = FlaxLlamaForCausalLMFixed(config, seed=0)
    with atomic_dir(folder) as tmp:
        save_file(to_torch_state(source.params), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.to_json_file(str(tmp / "config.json"))
        tokenizer.save_pretrained(str(tmp))
    out = tmp_path / "run"
    done = jlora_cli("finetune", *TINY, "--model", folder, "--out", out, "--steps", "3", "--eval-every", "3",
                     "--gen-examples", "0", "--quantize", "nf4")
    assert done.returncode == 0, done.stderr[-3000:]
    final = json.loads((out / "final.json").read_text())
    assert final["eval_perplexity"] < final["perplexity_before"]
    assert json.loads((out / "run.json").read_text())["options"]["quantize"] == "nf4"
    merged = FlaxLlamaForCausalLMFixed.from_pretrained(out / "merged", from_pt=True)
    lora, lora_config = load_peft(out / "adapter", source)
    ids = np.arange(3, 40, dtype=np.int32)[None]
    over_nf4 = jlora.apply(source, lora_config)(jlora.quantize(source.params, "nf4"), lora, ids).logits
    from_merged = merged(ids, params={k: v for k, v in merged.params.items() if k != "lm_head"}).logits
    np.testing.assert_allclose(np.asarray(from_merged), np.asarray(over_nf4), atol=1e-4)
    refused = jlora_cli("finetune", *TINY, "--model", folder, "--out", tmp_path / "r1", "--quantize", "gguf")
    assert refused.returncode == 2 and "--quantize gguf keeps the blocks of a GGUF file" in refused.stderr
    narrow = tmp_path / "narrow"  # the default tiny model is 32 wide
    with atomic_dir(narrow) as tmp:
        save_file(to_torch_state(FlaxLlamaForCausalLMFixed(tiny_llama_config(), seed=0).params),
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tiny_llama_config().to_json_file(str(tmp / "config.json"))
        tokenizer.save_pretrained(str(tmp))
    refused = jlora_cli("finetune", *TINY, "--model", narrow, "--out", tmp_path / "r2", "--quantize", "nf4")
    assert refused.returncode == 2 and re.search(r"quantize model/layers/0/\w+/\w+/kernel: NF4 blocks of 64 do not "
                                                 r"divide its block \(fan_in\) axis of length 32", refused.stderr)
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_bfloat16_causal_lm_run_and_its_float32_exports(tiny_model, tmp_path):
    from safetensors.numpy import load_file
    out = tmp_path / "run"
    flags = TINY[:TINY.index("--dtype")] + ["--dtype", "bfloat16"]
    done = jlora_cli("finetune", *flags, "--model", tiny_model, "--out", out, "--steps", "4", "--eval-every", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dtype: bfloat16: the frozen base in bfloat16" in done.stdout
    final = json.loads((out / "final.json").read_text())
    assert json.loads((out / "run.json").read_text())["options"]["dtype"] == "bfloat16"
    assert np.isfinite(final["eval_perplexity"]) and final["eval_perplexity"] < final["perplexity_before"]
    state = load_file(str(out / "merged" / "model.safetensors"))
    assert {v.dtype for v in state.values()} == {np.dtype(np.float32)}
