"""``jlora finetune --task causal-lm``: LoRA SFT of a decoder LLM, end to end.

Loads the model and data (:mod:`jlora.app.causal_lm`), splits off held-out examples, encodes them
with a completion-only loss, packs the training rows, trains with the shared loop
(:mod:`jlora.app.loop`: progress bar with tokens/s, checkpoints, exact resume, Ctrl-C safety),
scores held-out loss and perplexity every ``eval_every`` steps, generates completions for held-out
prompts before and after training with the jitted KV-cache sampler (the adapter unmerged) and
reports their ROUGE-L against the references, then exports the merged HF folder, the PEFT adapter
and, for Llama models, a merged GGUF file.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.app import causal_lm as clm


def generation_eval(lm: clm.CausalLM, frozen: Any, trainable: Any, config: Any,
                    held: list[tuple[np.ndarray, np.ndarray]], examples: list[Any], max_new_tokens: int,
                    batch_rows: int = 8) -> tuple[float, list[dict[str, Any]]]:
    """Greedy completions of held-out prompts with the adapter unmerged; ``(ROUGE-L, samples)``."""
    from jlora.generate import generate

    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    outputs: list[str] = []
    for start in range(0, len(held), batch_rows):
        part = held[start:start + batch_rows]
        ids, mask = clm.prompt_batch(part + [part[-1]] * (batch_rows - len(part)), pad)  # fixed shapes: one compile
        tokens = np.asarray(generate(lm.model, frozen, ids, lora=trainable, config=config, prompt_mask=mask,
                                     max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                                     pad_token_id=pad))[:len(part)]
        for row in tokens:
            cut = np.flatnonzero(row == tok.eos_token_id)
            outputs.append(tok.decode(row[:cut[0]] if len(cut) else row, skip_special_tokens=True).strip())
    references = [e.completion.strip() for e in examples]
    samples = [{"origin": e.origin, "reference": r, "generated": g} for e, r, g in zip(examples, references, outputs)]
    return clm.rouge_l(outputs, references), samples


def run(options: Any, requested_dtype: str | None = None) -> dict[str, Any]:
    """Run the causal-LM job for resolved :class:`jlora.app.finetune.FinetuneOptions` (``requested_dtype``:
    what ``--dtype`` said, e.g. ``auto``); returns the final metrics."""
    from jlora.app.finetune import batch_indices, make_optimizer
    from jlora.app.loop import Loop, run as run_loop
    from jlora.app.pods import gather
    from jlora.app.report import plot_metrics, read_metrics
    from jlora.app.run_folder import check_out, prepare_out
    from jlora.checkpoint import AdapterCheckpointer
    from jlora.core import init
    from jlora.hf.families import default_config
    from jlora.intercept import apply
    from jlora.optim import split
    from jlora.plan import make_plan
    from jlora.summary import count
    from jlora.train import make_train_step

    pods, primary = _pods(options)
    check_out(options)  # refused before anything loads; made once the model, data and adapters pass their checks
    lm = load_model(options)
    if options.pack and not lm.isolates_segments:
        raise ValueError(f"--pack: packed rows need attention kept within each example, which jlora gives "
                         f"Llama-family models; {lm.family} would attend across examples. Pass --no-pack")
    examples = clm.load_examples(options.data)
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    train_enc, held_enc, held_examples = clm.split_encoded(
        tok, examples, max_length=options.max_length, seq_len=options.seq_len, eval_fraction=options.eval_fraction,
        seed=options.seed)
    train = clm.rows(train_enc, options.seq_len, packed=options.pack, pad_id=pad)
    held = clm.rows(held_enc[:options.eval_examples], options.seq_len, packed=options.pack, pad_id=pad)
    gen_held, gen_examples = held_enc[:options.gen_examples], held_examples[:options.gen_examples]
    if len(train["input_ids"]) < options.batch:
        raise ValueError(f"--batch {options.batch}: only {len(train['input_ids'])} training rows of {options.seq_len} tokens")

    overrides = {"target_modules": options.targets} if options.targets else {}
    config = default_config(lm.model, r=options.rank, lora_alpha=options.alpha, **overrides)
    lora = init(jax.random.key(options.seed), lm.params, config, dtype=jnp.float32)  # float32 over any base
    trainable, frozen = split(lm.params, lora, config)
    host_frozen = frozen  # generation and exports read host copies (any mesh, any number of processes)
    head_adapted = lm.head_module in make_plan(lm.params, config, lora=lora)
    f = apply(lm.model, config)  # the head only where targets are (a bound over every possible batch):
    loss_fn = clm.make_loss(lm, f, fused=not head_adapted,
                            targets_cap=clm.targets_cap(train, options.batch // options.accumulate))
    score_fn = clm.make_loss(lm, f, fused=not head_adapted, targets_cap=clm.targets_cap(held, options.batch))
    tx = make_optimizer(options, config)
    opt_state = tx.init(trainable)
    shardings = None
    if pods is not None:
        from jax.sharding import PartitionSpec as P
        shardings = pods.shardings(lm.model, lm.params, trainable, frozen, tx, config, P(pods.batch_axes or None))
        trainable, opt_state, frozen = shardings.place(trainable, opt_state, frozen)
    summary = str(count(lm.params, lora, config))
    stats = {"train_examples": len(train_enc), "held_out_examples": len(held_enc), "train_rows": len(train["input_ids"]),
             "train_target_tokens": int(sum(w.sum() for _, w in train_enc)),
             "row_fill": float((train["segment_ids"] > 0).mean())}
    out = prepare_out(options) if primary else Path(options.out)
    _barrier("prepared the run folder")
    if primary:
        (out / "run.json").write_text(json.dumps({"options": dataclasses.asdict(options), "summary": summary,
                                                  "model_source": lm.source, "lora_config": config.to_dict(), **stats},
                                                 indent=2, default=str))
    checkpointer = AdapterCheckpointer(out / "checkpoints", config, lm.params, max_to_keep=2)
    step_fn = make_train_step(loss_fn, tx, shardings, donate=False, accumulate=options.accumulate,
                              weight_fn=clm.target_weight)
    score = clm.make_scorer(score_fn, options.batch)
    start, history = 0, []
    if options.resume:
        done, trainable, opt_state = checkpointer.restore(
            trainable, opt_state, shardings=(shardings.trainable, shardings.opt_state) if shardings else None)
        start, history = done + 1, read_metrics(out, done + 1)
        print(f"resumed after step {done + 1} (checkpoints/{done} in {out})")
    say = print if primary else (lambda *a, **k: None)
    say(summary)
    from jlora.precision import describe_choice
    say(describe_choice(requested_dtype or options.dtype, options.dtype) + ("" if options.dtype == "float32" else
        ": the frozen base in bfloat16; adapters, optimizer state and the loss in float32"))
    say(f"model: {lm.source} ({lm.family}); data: {options.data}: {stats['train_examples']} train examples in "
        f"{stats['train_rows']} rows of {options.seq_len} ({'packed' if options.pack else 'one per row'}, "
        f"{stats['row_fill']:.0%} filled), {stats['held_out_examples']} held out"
        + (f"; mesh {pods.axes} over {jax.process_count()} process(es)" if pods else ""))
    generating = bool(gen_examples and options.gen_examples)
    samples_before = None
    if start == 0:
        history.append({"step": 0, **score(trainable, frozen, held)})
        message = f"step 0: held-out perplexity {history[-1]['eval_perplexity']:.2f}"
        if generating:
            history[-1]["eval_rouge_l"], samples_before = generation_eval(
                lm, host_frozen, gather(trainable), config, gen_held, gen_examples, options.max_new_tokens)
            message += f", ROUGE-L {history[-1]['eval_rouge_l']:.4f}"
        say(message + " (before training)")

    def batch_at(step: int) -> dict[str, np.ndarray]:
        picked = batch_indices(step, len(train["input_ids"]), options.batch, options.seed)
        return {k: v[picked] for k, v in train.items()}

    loop = Loop(step_fn=step_fn, batch_at=batch_at, evaluate=lambda t: score(t, frozen, held),
                units=lambda b: {"tokens": int((b["segment_ids"] > 0).sum())}, out=out, steps=options.steps,
                eval_every=options.eval_every, checkpointer=checkpointer, progress=options.progress and primary,
                describe=lambda r: f"held-out loss {r['eval_loss']:.4f}, perplexity {r['eval_perplexity']:.2f}",
                place=pods.put if pods else (lambda b: b), primary=primary)
    trainable, opt_state, seconds = run_loop(loop, trainable, frozen, opt_state, start, history)
    checkpointer.close()
    trainable = gather(trainable)
    final = {**history[-1], "trainable_params": int(sum(x.size for x in jax.tree_util.tree_leaves(trainable))),
             "train_seconds": round(seconds, 1)}
    if history[0]["step"] == 0:
        final["perplexity_before"] = history[0]["eval_perplexity"]
    if generating:
        final["eval_rouge_l"], samples_after = generation_eval(lm, host_frozen, trainable, config, gen_held,
                                                               gen_examples, options.max_new_tokens)
        if history[0]["step"] == 0 and "eval_rouge_l" in history[0]:
            final["rouge_l_before"] = history[0]["eval_rouge_l"]
        if primary:
            clm.write_samples(out / "samples.jsonl", [{**a, "generated_before": b["generated"]} if b else a for a, b in
                                                      zip(samples_after, samples_before or [None] * len(samples_after))])
        say(f"held-out ROUGE-L of {len(samples_after)} generated completions: {final['eval_rouge_l']:.4f} "
            f"(samples in {out / 'samples.jsonl'})")
    if primary:
        final["plot"] = str(plot_metrics(out, history, f"LoRA SFT on {options.data} ({Path(lm.source).name})"))
        if options.export:
            final.update(export_all(out, lm, host_frozen, trainable, config))
        (out / "final.json").write_text(json.dumps(final, indent=2))
    say("final: " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in final.items()))
    _barrier("finished")
    return final


def load_model(options: Any) -> clm.CausalLM:
    """The run's model, with room for its rows and for a prompt plus the generated tokens."""
    return clm.load_causal_lm(options.model, max_positions=max(options.seq_len, options.max_length + options.max_new_tokens),
                              dtype=options.dtype, remat=options.remat, quantize=options.quantize)


def _pods(options: Any) -> tuple[Any, bool]:
    """The mesh of ``--mesh`` (None without one) and whether this is the primary process."""
    from jlora.app.pods import Pods
    pods = Pods.build(options.mesh) if options.mesh else None
    if pods is not None:
        pods.check_rows(options.batch, options.accumulate)
    return pods, jax.process_index() == 0


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def export_all(out: Path, lm: clm.CausalLM, frozen: Any, trainable: Any, config: Any,
               overwrite: bool = False) -> dict[str, str]:
    """``merged/`` (HF folder), ``adapter/`` (PEFT) and, for a Llama model loaded from GGUF, ``merged.gguf``
    (its tokenizer fields are copied from the source file). A bfloat16 base is merged and written in
    float32: the base's values as trained (exact in float32) plus the float32 delta, unrounded."""
    from jlora.hf.export import export_merged
    from jlora.hf.peft import save_peft
    from jlora.precision import cast_floats

    frozen = cast_floats(frozen, jnp.float32)

    with lm.full_context():  # the exports carry the model's own context length, not the run's cap
        done = {"merged": str(export_merged(out / "merged", lm.model, frozen, trainable, config,
                                            tokenizer=lm.tokenizer, overwrite=overwrite)),
                "adapter": str(save_peft(out / "adapter", lm.model, trainable, config, overwrite=overwrite))}
        if lm.family == "llama" and lm.gguf:
            from jlora.hf.gguf_export import export_gguf
            done["gguf"] = str(export_gguf(out / "merged.gguf", lm.model, frozen, trainable, config,
                                           source_gguf=lm.gguf, overwrite=overwrite))
    return done
