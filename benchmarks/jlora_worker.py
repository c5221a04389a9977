"""The jlora side of the two-process benchmarks: a worker (workers.py's protocol) in the jlora interpreter.

Ops: ``build`` (``workload``: ``main`` -- the CLI's classify step, ``sft`` -- the CLI's causal-LM step,
``gpt2`` -- compare_peft's W1/W2/tiny steps; in ``dtype``), ``probe`` (an ``n``-cube matmul in a dtype),
``memory`` (XLA's compiled memory analysis of a run, and this process's peak RSS) and ``inference``
(gpt2: jit forward latency). The first build of a workload also writes what the PEFT worker starts
from into ``dir``: ``model/`` (the built model's weights as an HF folder, PyTorch names:
``jlora.hf.export_merged`` with the initial adapter, whose ``lora_b`` is 0, so the base exactly),
``batch.npz`` (the step's batch, as torch takes it) and ``lora_a.npz`` (jlora's initial ``lora_a`` by
PyTorch module name, in jlora's ``(in, r)`` layout). Every build reports the loss at the initial
adapter (dropout off) and the trainable count, which the driver checks against PEFT's.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import transformers  # noqa: E402  (imported before the first build: the "imports only" RSS includes it)

import jlora  # noqa: E402
from workers import serve  # noqa: E402

SEED, NUM_LABELS, VOCAB_HIGH = 0, 5, 30000
BERT_TINY = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128)
RUNS: dict[str, Any] = {}
MEMORY: dict[str, dict] = {}
BUILT: dict[str, Any] = {}  # what a later op reads (gpt2 inference)


def compile_lowered(lowered: Any) -> tuple[Any, dict]:
    """``(compiled, {compile_s, memory, xla_flops})`` of a lowered step."""
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    memory = {k: int(getattr(mem, f"{k}_size_in_bytes", 0) or 0) for k in ("argument", "output", "alias", "temp")} \
        if mem is not None else {}
    return compiled, {"compile_s": compile_s, "memory": memory,
                      "xla_flops": float(cost["flops"]) if cost and "flops" in cost else None}


def leaf_dtypes(tree: Any) -> dict[str, int]:
    """Element counts by dtype of a tree's array leaves."""
    out: dict[str, int] = {}
    for x in jax.tree_util.tree_leaves(tree):
        if hasattr(x, "dtype"):
            out[str(x.dtype)] = out.get(str(x.dtype), 0) + int(np.prod(x.shape))
    return out


def count(tree: Any) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


def handoff(folder: Path, model: Any, params: Any, trainable: Any, config: Any, batch: dict[str, np.ndarray],
            tokenizer: Any = None) -> dict[str, str]:
    """Write ``model/``, ``batch.npz`` and ``lora_a.npz`` into ``folder`` (once; later builds reuse them)."""
    from jlora.hf.names import torch_key
    from jlora.tree import flatten
    paths = {"model": folder / "model", "batch": folder / "batch.npz", "lora_a": folder / "lora_a.npz"}
    if not paths["model"].exists():
        params32 = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32)
                                          if jnp.issubdtype(x.dtype, jnp.floating) else np.asarray(x), params)
        jlora.hf.export_merged(paths["model"], model, params32, trainable, config, tokenizer=tokenizer)
        lora_a = {torch_key((*k[:-1], "kernel"))[:-len(".weight")]: np.asarray(v, np.float32)
                  for k, v in flatten(trainable).items() if k[-1] == "lora_a"}
        np.savez(paths["lora_a"], **lora_a)
        np.savez(paths["batch"], **batch)
    return {k: str(v) for k, v in paths.items()}


def register(name: str, run: Any, info: dict) -> str:
    RUNS[name] = run
    MEMORY[name] = info.get("memory", {})
    return name


# ---------------------------------------------------------------- the main job (classify)

def tiny_bert_dir(root: Path) -> Path:
    """A random-init BERT of :data:`BERT_TINY`'s shape as an HF folder (PyTorch-named safetensors, no torch)."""
    if (root / "config.json").is_file():
        return root
    from jlora.hf.export import save_torch_safetensors
    from jlora.hf.names import to_torch_state
    config = transformers.BertConfig(**BERT_TINY, num_labels=NUM_LABELS)
    config.architectures = ["BertForSequenceClassification"]
    model = transformers.FlaxBertForSequenceClassification(config, seed=SEED)
    root.mkdir(parents=True)
    save_torch_safetensors(to_torch_state(model.params), root / "model.safetensors")
    config.to_json_file(str(root / "config.json"))
    return root


def main_batch(batch: int, seq: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    return {"input_ids": rng.integers(0, VOCAB_HIGH, (batch, seq)).astype(np.int32),
            "attention_mask": np.ones((batch, seq), np.int32),
            "labels": rng.integers(0, NUM_LABELS, batch).astype(np.int32)}


def build_main(dtype: str, dir: str, tiny: bool = False) -> dict:
    """The CLI's classify step (``jlora.app.finetune``: ``build``, ``make_optimizer``, ``_loss_and_logits``,
    ``make_train_step(donate=False)``), called as ``finetune()``'s loop calls it: numpy batch arrays,
    ``batch["rng"] = fold_in(<the CLI's dropout key>, step)`` per step, dropout active."""
    from jlora.app.finetune import DEFAULT_LR, FinetuneOptions, _loss_and_logits, build, dropout_key, make_optimizer
    from jlora.train import make_train_step
    if tiny:
        path = tiny_bert_dir(Path(dir) / "tiny-bert")
    else:
        from jlora.hf.shipped import minilm_path
        path = minilm_path()
    try:
        options = FinetuneOptions(model=str(path), seed=SEED, dtype=dtype).resolved()  # the CLI's defaults
    except ValueError as error:
        return {"unsupported": f"FinetuneOptions(dtype={dtype!r}): {error}"}
    if options.dtype != dtype:
        return {"unsupported": f"FinetuneOptions(dtype={dtype!r}) resolved to {options.dtype!r}"}
    data = main_batch(options.batch, options.max_length)
    model, params, config, trainable, frozen = build(options, NUM_LABELS)
    f = jlora.apply(model, config)
    tx = make_optimizer(options, config)
    opt_state = tx.init(trainable)
    step_fn = make_train_step(lambda t, fz, b: _loss_and_logits(model, f, t, fz, b, b["rng"], True)[0], tx,
                              donate=False)
    key = dropout_key(options.seed)
    compiled, info = compile_lowered(step_fn.lower(trainable, opt_state, frozen,
                                                   {**data, "rng": jax.random.fold_in(key, 0)}))
    box = {"t": trainable, "o": opt_state, "step": 0}

    def run():  # one step of finetune()'s loop: a fresh dict of the numpy arrays, the step's dropout key
        batch = dict(data)
        batch["rng"] = jax.random.fold_in(key, box["step"])
        box["t"], box["o"], loss = compiled(box["t"], box["o"], frozen, batch)
        box["step"] += 1
        return loss
    loss0 = float(jax.jit(lambda t, fz, b: _loss_and_logits(model, f, t, fz, b, None, False)[0])(
        trainable, frozen, data))  # eval mode: no dropout, comparable with PEFT's
    c = model.config
    files = handoff(Path(dir), model, params, trainable, config, data)
    info.update(trainable=count(trainable), loss0=loss0, dtypes={"trainable": leaf_dtypes(trainable),
                                                                 "frozen": leaf_dtypes(frozen)},
                options_dtype=options.dtype, dropout_key_impl=str(jax.random.key_impl(key)))
    return {"runs": {register(f"jlora_lora:{dtype}", run, info): info}, "files": files,
            "lora_config": config.to_dict(), "lr": options.lr or DEFAULT_LR[options.mode],
            "options": dataclasses.asdict(options),
            "workload": {"model": "tiny random-init BERT" if tiny else "all-MiniLM-L6-v2 (shipped)",
                         "path": str(path), "layers": c.num_hidden_layers, "hidden": c.hidden_size,
                         "num_labels": NUM_LABELS, "batch": options.batch, "seq": options.max_length,
                         "r": config.r, "alpha": config.lora_alpha, "targets": list(config.target_modules),
                         "modules_to_save": list(config.modules_to_save), "lora_dropout": config.lora_dropout,
                         "hidden_dropout": c.hidden_dropout_prob,
                         "attention_dropout": c.attention_probs_dropout_prob}}


# ---------------------------------------------------------------- the causal-LM (SFT) job

def build_sft(dtype: str, dir: str, tiny: bool = False, batch: int = 4, seq_len: int = 384,
              all_positions: bool = False, quantize: str | None = None) -> dict:
    """The CLI's causal-LM step (``lm_job.load_model``, ``default_config``, ``init``, ``split``, ``make_loss``
    with the CLI's ``targets_cap``, ``make_optimizer``, ``make_train_step(donate=False, weight_fn=...)``)
    on the first ``batch`` packed rows of the BBC headline task; with ``quantize`` also the QLoRA step."""
    from jlora.app import causal_lm as clm
    from jlora.app.finetune import TASK_DEFAULTS, FinetuneOptions, make_optimizer
    from jlora.app.lm_job import load_model
    from jlora.app.sft_data import bbc_headlines, encode
    model = str(tiny_llama_dir(Path(dir) / "tiny-llama")) if tiny else "smollm2"  # the CLI's --model
    try:
        options = FinetuneOptions(task="causal-lm", model=model, batch=batch, seq_len=seq_len, seed=SEED, dtype=dtype,
                                  max_length=min(TASK_DEFAULTS["causal-lm"]["max_length"], seq_len)).resolved()
    except ValueError as error:
        return {"unsupported": f"FinetuneOptions(task='causal-lm', dtype={dtype!r}): {error}"}
    lm = load_model(options)
    tok = lm.tokenizer
    rows = clm.rows([encode(tok, e, options.max_length) for e in bbc_headlines()], options.seq_len,
                    packed=options.pack, pad_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    data = {k: v[:options.batch] for k, v in rows.items()}  # the same batch every step
    cap = None if all_positions else clm.targets_cap(rows, options.batch // options.accumulate)  # as the CLI
    config = jlora.hf.default_config(lm.model, r=options.rank, lora_alpha=options.alpha)
    out: dict[str, Any] = {"runs": {}}
    for variant, this in (("jlora_lora", lm), *((("jlora_qlora", None),) if quantize else ())):
        if this is None:
            this = load_model(dataclasses.replace(options, quantize=quantize))
        lora = jlora.init(jax.random.key(options.seed), this.params, config)
        trainable, frozen = jlora.split(this.params, lora, config)
        tx = make_optimizer(options, config)
        opt_state = tx.init(trainable)
        step_fn = jlora.make_train_step(clm.make_loss(this, jlora.apply(this.model, config), targets_cap=cap), tx,
                                        donate=False, accumulate=options.accumulate, weight_fn=clm.target_weight)
        compiled, info = compile_lowered(step_fn.lower(trainable, opt_state, frozen, data))
        box = {"t": trainable, "o": opt_state}

        def run(box=box, compiled=compiled, frozen=frozen):
            box["t"], box["o"], loss = compiled(box["t"], box["o"], frozen, data)
            return loss
        mem, c = info["memory"], this.model.config
        # torch's FLOP count applies the (frozen) head at all b*s positions, forward + dX: jlora at `cap` only
        info["flops_delta"] = -4.0 * (data["input_ids"].size - cap) * c.hidden_size * c.vocab_size if cap else 0.0
        info.update(trainable=count(trainable), loss0=float(compiled(trainable, opt_state, frozen, data)[2]),
                    dtypes={"trainable": leaf_dtypes(trainable), "frozen": leaf_dtypes(frozen)},
                    options_dtype=options.dtype, quantize=quantize if variant == "jlora_qlora" else None,
                    peak_bytes=sum(mem.get(k, 0) for k in ("argument", "temp", "output")) - mem.get("alias", 0))
        out["runs"][register(f"{variant}:{dtype}", run, info)] = info
        if variant == "jlora_lora":
            out["files"] = handoff(Path(dir), lm.model, lm.params, trainable, config, torch_batch(data), tok)
    c = lm.model.config
    tokens = int((data["segment_ids"] > 0).sum())
    out.update(lora_config=config.to_dict(), lr=options.lr, options=dataclasses.asdict(options), targets_cap=cap,
               workload={"model": "tiny random-init Llama" if tiny else "SmolLM2-135M-Instruct (shipped GGUF)",
                         "source": lm.source, "layers": c.num_hidden_layers, "hidden": c.hidden_size,
                         "vocab": c.vocab_size, "batch": options.batch, "seq": options.seq_len, "tokens": tokens,
                         "targets": int((torch_batch(data)["labels"] >= 0).sum()), "r": config.r,
                         "alpha": config.lora_alpha, "target_modules": list(config.target_modules), "lr": options.lr})
    return out


def tiny_llama_dir(root: Path) -> Path:
    """A random tied 2-layer hidden-64 Llama with SmolLM2's tokenizer: an HF folder, PyTorch-named safetensors."""
    if (root / "config.json").is_file():
        return root
    from jlora.hf.export import save_torch_safetensors
    from jlora.hf.llama import FlaxLlamaForCausalLMFixed, read_gguf_tokenizer
    from jlora.hf.names import to_torch_state
    from jlora.hf.shipped import smollm2_gguf_path
    root.mkdir(parents=True)
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=49152, max_position_embeddings=2048,
                                      rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                                      pad_token_id=2)
    model = FlaxLlamaForCausalLMFixed(config, seed=SEED)
    save_torch_safetensors(to_torch_state(model.params), root / "model.safetensors")
    config.to_json_file(str(root / "config.json"))
    read_gguf_tokenizer(smollm2_gguf_path()).save_pretrained(str(root))
    return root


def torch_batch(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """jlora's packed rows as transformers takes them: a (b, 1, q, k) bool mask (True: attend), causal within a
    segment; ``position_ids``; ``labels`` -100 where jlora's target weight is 0 (HF predicts labels[t + 1] at t);
    ``segment_ids`` kept for the PEFT side's packing check."""
    ids, seg = data["input_ids"].astype(np.int64), data["segment_ids"]
    causal = np.tril(np.ones((ids.shape[1],) * 2, bool))
    mask = causal[None] & (seg[:, :, None] == seg[:, None, :])  # padding (segment 0) attends only padding
    weights = np.asarray(jlora.next_token_targets(data["input_ids"], data["weights"], seg)[1])
    labels = np.full_like(ids, -100)
    labels[:, 1:] = np.where(weights[:, :-1] > 0, ids[:, 1:], -100)
    return {"input_ids": ids, "attention_mask": mask[:, None], "position_ids": data["positions"].astype(np.int64),
            "labels": labels, "segment_ids": np.asarray(seg)}


# ---------------------------------------------------------------- compare_peft's GPT-2 workloads

def build_gpt2(dtype: str, dir: str, spec: dict, vocab: int = 50257, loss: str = "fused", loss_chunk: int = 1024,
               variants: tuple[str, ...] = ("jlora_lora", "jlora_full")) -> dict:
    """gpt2_workload's jlora steps (LoRA r=8 on c_attn, and full fine-tuning) of a random-init GPT-2; in
    bfloat16 the model computes in bf16 with the frozen base stored in bf16, the adapters and their Adam
    state float32 (the CLI's recipe, jlora.precision), LoRA only."""
    import gpt2_workload as g
    hf_config = g.gpt2_config(spec, vocab)
    built = g.build_jax(hf_config, spec, loss, loss_chunk, dtype=dtype)
    BUILT[f"gpt2:{dtype}"] = built
    out: dict[str, Any] = {"runs": {}}
    variants = tuple(v for v in variants if dtype == "float32" or v == "jlora_lora")  # bf16: LoRA only
    for name, (run, info) in g.prepare_jax(built, variants).items():
        _, state, _, rest = built["steps"][name]
        info.update(trainable=count(state), loss0=float(run()),  # the first call's loss: at the initial state
                    dtypes={"trainable": leaf_dtypes(state), "frozen": leaf_dtypes(rest)})
        out["runs"][register(f"{name}:{dtype}", run, info)] = info
    trainable = built["steps"]["jlora_lora"][1]
    out["files"] = handoff(Path(dir), built["model"], built["params"], trainable, built["config"],
                           {"input_ids": np.asarray(built["ids"], np.int64)})
    out.update(lora_config=built["config"].to_dict(), bytes=built["bytes"], lr=1e-4, workload=dict(spec, vocab=vocab))
    return out


def inference(shapes: list, rounds: int) -> dict:
    """gpt2: jit forward latency of base, merged and unmerged LoRA (:func:`gpt2_workload.jax_inference`)."""
    import gpt2_workload as g
    return {"inference": g.jax_inference(BUILT["gpt2:float32"], [tuple(s) for s in shapes], rounds)}


def build(workload: str, dtype: str, dir: str, **spec: Any) -> dict:
    return {"main": build_main, "sft": build_sft, "gpt2": build_gpt2}[workload](dtype, dir, **spec)


def probe(n: int, dtype: str) -> dict:
    """A jitted ``(n, n) @ (n, n)`` matmul in ``dtype`` as run ``xla_matmul:<dtype>``."""
    from machine import xla_matmul_probe
    return {"run": register(f"xla_matmul:{dtype}", xla_matmul_probe(n, dtype), {}), "flops": 2.0 * n ** 3}


def memory(name: str) -> dict:
    from workers import peak_rss_mib
    return {"memory": MEMORY.get(name, {}), "peak_rss_mib": peak_rss_mib()}


if __name__ == "__main__":
    serve({"build": build, "probe": probe, "memory": memory, "inference": inference}, RUNS, jax.block_until_ready)
