"""``jlora``: the command line. ``jlora finetune`` runs the main job with the shipped defaults.

    jlora finetune [--model minilm|HF_DIR] [--data bbc-news|FILE.csv] [--rank 8] [--alpha 16] ...
    jlora finetune --task causal-lm [--model smollm2|FILE.gguf|HF_DIR] [--data bbc-headlines|bbc-category|bbc-lead|FILE.jsonl|FILE.txt]
    jlora eval --model RUN/merged [--data bbc-news]        held-out accuracy of an exported model
    jlora export --run RUN --format hf|peft --dest DIR     from a run's newest checkpoint
    jlora merge --run RUN --dest DIR                       the same as export --format hf
    jlora serve [--model smollm2] --adapter NAME=RUN_OR_PEFT_DIR ... [--port 8000]   many adapters, one batch
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from jlora.app.finetune import MODES, TASK_DEFAULTS, TASKS, FinetuneOptions


def _default(name: str) -> str:
    return " / ".join(f"{task}: {TASK_DEFAULTS[task][name]}" for task in TASKS)


def _finetune_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="LoRA fine-tune an encoder classifier, or a decoder LLM (--task causal-lm)")
    d = FinetuneOptions()
    p.add_argument("--task", default=d.task, choices=TASKS,
                   help="classify (encoder + head) or causal-lm (SFT of a decoder, completion-only loss)")
    p.add_argument("--model", default=None, help="classify: 'minilm' (shipped) or an HF folder; causal-lm: "
                   "'smollm2' (shipped GGUF), a Llama .gguf file, or an HF folder (llama, mistral, gemma, gpt2)")
    p.add_argument("--data", default=None, help="classify: 'bbc-news' (shipped) or a CSV with text,label columns; "
                   "causal-lm: 'bbc-headlines' (shipped default: article -> headline), 'bbc-category' (article -> "
                   "section), 'bbc-lead' (headline -> first sentence), a JSONL of prompt/completion or chat "
                   "rows, or a .txt")
    p.add_argument("--out", default=None, help=f"run folder (default {_default('out')})")
    p.add_argument("--mode", default=d.mode, choices=MODES, help="what trains (lora: adapters + head)")
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--targets", default=None, help="comma-separated module names (default: the family's W_q,W_v)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default per mode)")
    p.add_argument("--steps", type=int, default=None, help=f"default {_default('steps')}")
    p.add_argument("--batch", type=int, default=None, help=f"rows per step (default {_default('batch')})")
    p.add_argument("--max-length", type=int, default=None, help=f"tokens per example (default {_default('max_length')})")
    p.add_argument("--eval-every", type=int, default=None, help=f"default {_default('eval_every')}")
    p.add_argument("--eval-fraction", type=float, default=d.eval_fraction)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--mesh", default=None, help="named mesh axes over the devices, e.g. data=2,fsdp=4 or "
                   "data=2,tensor=4 (a bare N: data=N); default one device")
    p.add_argument("--coordinator", default=None, help="multi-host: HOST:PORT of process 0 (jax.distributed; "
                   "or the environment variables jax reads, e.g. JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=int, default=None, help="multi-host: the number of processes")
    p.add_argument("--process-id", type=int, default=None, help="multi-host: this process's index")
    p.add_argument("--quantize", default=None, choices=("nf4", "int8", "gguf"),
                   help="QLoRA: train adapters over a quantized frozen base (nf4: 4-bit NormalFloat, blocks of 64; "
                   "int8: per-channel; gguf (causal-lm): keep a GGUF file's Q4_0/Q4_1/Q8_0 blocks as they are)")
    p.add_argument("--dtype", default=d.dtype, choices=("auto", "bfloat16", "float32"),
                   help="computation dtype; auto (default): bfloat16 where this backend has fast bf16 matmuls "
                   "(measured at start), float32 otherwise. bfloat16 stores the frozen base in bf16; adapters, "
                   "the trained head, optimizer state and the loss stay float32")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-export", action="store_true", help="skip the merged HF / PEFT exports")
    p.add_argument("--no-progress", action="store_true")
    lm = p.add_argument_group("causal-lm")
    lm.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per training row")
    lm.add_argument("--no-pack", action="store_true", help="one example per row instead of packing several")
    lm.add_argument("--accumulate", type=int, default=d.accumulate, help="micro-batches per step (gradient accumulation)")
    lm.add_argument("--remat", action="store_true", help="recompute each layer's activations in the backward pass")
    lm.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="generation length of the evaluation")
    lm.add_argument("--eval-examples", type=int, default=d.eval_examples, help="held-out examples scored for perplexity")
    lm.add_argument("--gen-examples", type=int, default=d.gen_examples,
                    help="held-out prompts completed before/after training (ROUGE-L, samples.jsonl); 0: none")


def _start_distributed(args: argparse.Namespace) -> None:
    """``jax.distributed.initialize`` from the flags, or from the environment (JAX_COORDINATOR_ADDRESS,
    with JAX_NUM_PROCESSES / JAX_PROCESS_ID, or a cluster jax detects: SLURM, Open MPI, TPU)."""
    import os
    flags = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in flags):
        if any(v is None for v in flags):
            raise ValueError("--coordinator, --num-processes and --process-id go together (multi-host)")
        if not 0 <= args.process_id < args.num_processes:
            raise ValueError(f"--process-id {args.process_id}: expected 0 <= id < --num-processes {args.num_processes}")
    elif "JAX_COORDINATOR_ADDRESS" not in os.environ:
        return
    import jax
    env = {k: int(os.environ[v]) for k, v in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID"))
           if v in os.environ}
    jax.distributed.initialize(args.coordinator, **({"num_processes": args.num_processes,
                                                     "process_id": args.process_id} if args.coordinator else env))


def _run_finetune(args: argparse.Namespace) -> int:
    from jlora.app.finetune import finetune
    _start_distributed(args)
    options = FinetuneOptions(
        task=args.task, seq_len=args.seq_len, dtype=args.dtype, remat=args.remat, pack=not args.no_pack, accumulate=args.accumulate,
        max_new_tokens=args.max_new_tokens, eval_examples=args.eval_examples, gen_examples=args.gen_examples,
        model=args.model, data=args.data, out=args.out, mode=args.mode, rank=args.rank, alpha=args.alpha,
        targets=tuple(t for t in args.targets.split(",") if t) if args.targets else None, lr=args.lr,
        steps=args.steps, batch=args.batch, max_length=args.max_length, eval_every=args.eval_every,
        eval_fraction=args.eval_fraction, seed=args.seed, mesh=args.mesh, resume=args.resume,
        overwrite=args.overwrite, export=not args.no_export, progress=not args.no_progress, quantize=args.quantize)
    finetune(options)
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    import transformers
    from jlora.app.data import load_dataset
    from jlora.app.finetune import encode, make_evaluator

    transformers.logging.set_verbosity_error()
    dataset = load_dataset(args.data)
    _, held = dataset.split(args.eval_fraction, args.seed)
    from jlora.precision import cast_floats, resolve_dtype
    dtype = resolve_dtype(args.dtype)
    config = transformers.AutoConfig.from_pretrained(args.model)  # not from dtype=: see finetune.build
    model = transformers.FlaxAutoModelForSequenceClassification.from_pretrained(args.model, config=config,
                                                                                from_pt=True, dtype=dtype)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    data = encode(tokenizer, held, args.max_length)
    metrics = make_evaluator(model, None)(cast_floats(model.params, dtype), {}, data)
    print(json.dumps({"model": args.model, "held_out_examples": len(held), "dtype": dtype, **metrics}))
    return 0


def _run_export(args: argparse.Namespace) -> int:
    import jax
    import transformers
    from jlora.checkpoint import AdapterCheckpointer
    from jlora.config import LoraConfig
    from jlora.app.finetune import FinetuneOptions, build, make_optimizer, model_dir
    from jlora.hf.export import export_merged
    from jlora.hf.peft import save_peft
    from jlora.precision import cast_floats

    run = Path(args.run)
    info_path = run / "run.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"--run: {run} has no run.json; is it a jlora finetune --out folder?")
    info = json.loads(info_path.read_text())
    if not info.get("lora_config"):
        raise ValueError(f"--run: {run} was a --mode {info['options']['mode']} run; only lora runs export adapters")
    options = FinetuneOptions(**{k: v for k, v in info["options"].items() if k in FinetuneOptions.__annotations__})
    if options.task == "causal-lm":
        return _export_causal_lm(args, run, options, LoraConfig.from_dict(info["lora_config"]))
    if args.format not in ("hf", "peft"):
        raise ValueError(f"--format {args.format}: a classification run exports as hf or peft")
    model, params, config, trainable, frozen = build(options, len(info["labels"]))
    frozen = cast_floats(frozen, "float32")  # a bfloat16 run's base merged and written in float32, as the run did
    if config != LoraConfig.from_dict(info["lora_config"]):
        raise ValueError(f"--run: {run}/run.json's LoRA config does not match the rebuilt one")
    opt_state = jax.eval_shape(make_optimizer(options, config).init, trainable)
    with AdapterCheckpointer(run / "checkpoints", config, params) as checkpointer:
        step, trainable, _ = checkpointer.restore(trainable, opt_state)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir(options.model))
    if args.format == "hf":
        dest = export_merged(args.dest, model, frozen, trainable, config, tokenizer=tokenizer, overwrite=args.overwrite)
    else:
        dest = save_peft(args.dest, model, trainable, config, overwrite=args.overwrite)
    print(f"exported {run} after step {step + 1} (checkpoints/{step}) as {args.format} to {dest}")
    return 0


def _export_causal_lm(args: argparse.Namespace, run: Path, options: FinetuneOptions, config: Any) -> int:
    import jax
    from jlora.app.finetune import make_optimizer
    from jlora.app.lm_job import export_all, load_model
    from jlora.checkpoint import AdapterCheckpointer
    from jlora.core import init
    from jlora.hf.export import atomic_dir, export_merged
    from jlora.hf.peft import save_peft
    from jlora.optim import split
    from jlora.precision import cast_floats

    lm = load_model(options)
    if args.format == "gguf" and not (lm.family == "llama" and lm.gguf):
        raise ValueError(f"--format gguf: GGUF export is for Llama models loaded from GGUF; {lm.source} is not one")
    trainable, frozen = split(lm.params, init(jax.random.key(0), lm.params, config), config)
    frozen = cast_floats(frozen, "float32")  # a bfloat16 run's base merged and written in float32, as the run did
    opt_state = jax.eval_shape(make_optimizer(options, config).init, trainable)
    with AdapterCheckpointer(run / "checkpoints", config, lm.params) as checkpointer:
        step, trainable, _ = checkpointer.restore(trainable, opt_state)
    with lm.full_context():
        if args.format == "hf":
            dest = export_merged(args.dest, lm.model, frozen, trainable, config, tokenizer=lm.tokenizer,
                                 overwrite=args.overwrite)
        elif args.format == "peft":
            dest = save_peft(args.dest, lm.model, trainable, config, overwrite=args.overwrite)
        elif args.format == "gguf":
            from jlora.hf.gguf_export import export_gguf
            dest = export_gguf(args.dest, lm.model, frozen, trainable, config, source_gguf=lm.gguf,
                               overwrite=args.overwrite)
    if args.format == "all":
        with atomic_dir(args.dest, overwrite=args.overwrite) as tmp:
            written = export_all(tmp, lm, frozen, trainable, config)
        dest = f"{args.dest} ({', '.join(Path(v).name for v in written.values())}" + \
            ("" if "gguf" in written else "; no merged.gguf: GGUF export is for Llama models loaded from GGUF") + ")"
    print(f"exported {run} after step {step + 1} (checkpoints/{step}) as {args.format} to {dest}")
    return 0


def _export_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--run", required=True, help="a jlora finetune --out folder")
    p.add_argument("--dest", required=True, help="folder to write (refused if it exists, unless --overwrite)")
    if name == "export":
        p.add_argument("--format", choices=("hf", "peft", "gguf", "all"), default="hf",
                       help="hf, peft; gguf and all (every format, each in its subfolder) for causal-lm runs")
    p.add_argument("--overwrite", action="store_true")


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    from jlora.app.serve import ServeOptions
    d = ServeOptions()
    p = sub.add_parser("serve", help="serve a base LLM and many LoRA adapters over HTTP, batching requests for "
                                     "different adapters into one generate call")
    p.add_argument("--model", default=d.model, help="'smollm2' (shipped GGUF), a Llama .gguf file, or an HF folder")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="an adapter to load at start: a PEFT folder or a jlora finetune run folder (repeatable)")
    p.add_argument("--slots", type=int, default=d.slots, help="adapter slots in the bank (adapters at once)")
    p.add_argument("--rank", type=int, default=d.rank, help="the largest adapter rank the bank takes")
    p.add_argument("--targets", default=",".join(d.targets),
                   help="modules the bank covers besides those of the --adapter ones (comma-separated)")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port, help="0: any free port (printed)")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="rows per generate call")
    p.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="the most a request may ask for")
    p.add_argument("--dtype", default=d.dtype, choices=("auto", "bfloat16", "float32"),
                   help="computation dtype of the base (stored in it) and the KV cache; auto (default): bfloat16 "
                   "where this backend has fast bf16 matmuls (measured at start); adapters stay float32")
    p.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms,
                   help="how long the batcher waits for more requests after the first")


def _run_serve(args: argparse.Namespace) -> int:
    from jlora.app.serve import ServeOptions
    from jlora.app.serve_http import run
    adapters = []
    for item in args.adapter:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--adapter: expected NAME=DIR, got {item!r}")
        adapters.append((name, folder))
    for flag in ("slots", "rank", "max_batch", "max_prompt_tokens", "max_new_tokens"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')}: expected a positive integer, got {getattr(args, flag)}")
    if not (math.isfinite(args.batch_wait_ms) and args.batch_wait_ms >= 0):
        raise ValueError(f"--batch-wait-ms: expected a finite number >= 0, got {args.batch_wait_ms}")
    if len(adapters) > args.slots:
        raise ValueError(f"--adapter: {len(adapters)} adapters do not fit --slots {args.slots}")
    targets = tuple(t for t in args.targets.split(",") if t)
    return run(ServeOptions(args.model, tuple(adapters), args.slots, args.rank, targets, args.host, args.port,
                            args.max_batch, args.max_prompt_tokens, args.max_new_tokens, args.batch_wait_ms,
                            dtype=args.dtype))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jlora", description="LoRA fine-tuning with JAX (see README.md)")
    sub = parser.add_subparsers(dest="command", required=True)
    _finetune_parser(sub)
    p = sub.add_parser("eval", help="held-out accuracy of an exported HF classification model")
    p.add_argument("--model", required=True, help="an HF folder, e.g. RUN/merged")
    p.add_argument("--data", default="bbc-news")
    p.add_argument("--eval-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                   help="computation dtype (auto: bfloat16 where this backend has fast bf16 matmuls)")
    _export_parser(sub, "export", "write a run's adapters as a merged HF folder or a PEFT adapter")
    _export_parser(sub, "merge", "write a run's merged model as an HF folder (= export --format hf)")
    _serve_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "merge":
        args.format = "hf"
    run = {"finetune": _run_finetune, "eval": _run_eval, "export": _run_export, "merge": _run_export,
           "serve": _run_serve}[args.command]
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130
    except (FileExistsError, FileNotFoundError, ModuleNotFoundError, ValueError) as err:
        print(f"jlora {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
