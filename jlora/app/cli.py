"""``jlora``: the command line. ``jlora finetune`` runs the main job with the shipped defaults.

    jlora finetune [--model minilm|HF_DIR] [--data bbc-news|FILE.csv] [--rank 8] [--alpha 16] ...
    jlora eval --model RUN/merged [--data bbc-news]        held-out accuracy of an exported model
    jlora export --run RUN --format hf|peft --dest DIR     from a run's newest checkpoint
    jlora merge --run RUN --dest DIR                       the same as export --format hf
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from jlora.app.finetune import MODES, FinetuneOptions


def _finetune_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="LoRA fine-tune a pretrained encoder for text classification")
    d = FinetuneOptions()
    p.add_argument("--model", default=d.model, help="'minilm' (shipped all-MiniLM-L6-v2) or an HF folder")
    p.add_argument("--data", default=d.data, help="'bbc-news' (shipped) or a CSV with text,label columns")
    p.add_argument("--out", default=d.out, help="run folder (metrics, plot, checkpoints, exports)")
    p.add_argument("--mode", default=d.mode, choices=MODES, help="what trains (lora: adapters + head)")
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--targets", default=None, help="comma-separated module names (default: the family's W_q,W_v)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default per mode)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-fraction", type=float, default=d.eval_fraction)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--mesh", type=int, default=d.mesh, help="data-parallel devices")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-export", action="store_true", help="skip the merged HF / PEFT exports")
    p.add_argument("--no-progress", action="store_true")


def _run_finetune(args: argparse.Namespace) -> int:
    from jlora.app.finetune import finetune
    options = FinetuneOptions(
        model=args.model, data=args.data, out=args.out, mode=args.mode, rank=args.rank, alpha=args.alpha,
        targets=tuple(t for t in args.targets.split(",") if t) if args.targets else None, lr=args.lr,
        steps=args.steps, batch=args.batch, max_length=args.max_length, eval_every=args.eval_every,
        eval_fraction=args.eval_fraction, seed=args.seed, mesh=args.mesh, resume=args.resume,
        overwrite=args.overwrite, export=not args.no_export, progress=not args.no_progress)
    finetune(options)
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    import transformers
    from jlora.app.data import load_dataset
    from jlora.app.finetune import encode, make_evaluator

    transformers.logging.set_verbosity_error()
    dataset = load_dataset(args.data)
    _, held = dataset.split(args.eval_fraction, args.seed)
    model = transformers.FlaxAutoModelForSequenceClassification.from_pretrained(args.model, from_pt=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    data = encode(tokenizer, held, args.max_length)
    metrics = make_evaluator(model, None)(model.params, {}, data)
    print(json.dumps({"model": args.model, "held_out_examples": len(held), **metrics}))
    return 0


def _run_export(args: argparse.Namespace) -> int:
    import jax
    import transformers
    from jlora.checkpoint import AdapterCheckpointer
    from jlora.config import LoraConfig
    from jlora.app.finetune import FinetuneOptions, build, make_optimizer, model_dir
    from jlora.hf.export import export_merged
    from jlora.hf.peft import save_peft

    run = Path(args.run)
    info_path = run / "run.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"--run: {run} has no run.json; is it a jlora finetune --out folder?")
    info = json.loads(info_path.read_text())
    if not info.get("lora_config"):
        raise ValueError(f"--run: {run} was a --mode {info['options']['mode']} run; only lora runs export adapters")
    options = FinetuneOptions(**{k: v for k, v in info["options"].items() if k in FinetuneOptions.__annotations__})
    model, params, config, trainable, frozen = build(options, len(info["labels"]))
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
    print(f"exported step {step} of {run} as {args.format} to {dest}")
    return 0


def _export_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--run", required=True, help="a jlora finetune --out folder")
    p.add_argument("--dest", required=True, help="folder to write (refused if it exists, unless --overwrite)")
    if name == "export":
        p.add_argument("--format", choices=("hf", "peft"), default="hf")
    p.add_argument("--overwrite", action="store_true")


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
    _export_parser(sub, "export", "write a run's adapters as a merged HF folder or a PEFT adapter")
    _export_parser(sub, "merge", "write a run's merged model as an HF folder (= export --format hf)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "merge":
        args.format = "hf"
    run = {"finetune": _run_finetune, "eval": _run_eval, "export": _run_export, "merge": _run_export}[args.command]
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130
    except (FileExistsError, FileNotFoundError, ModuleNotFoundError, ValueError) as err:
        print(f"jlora {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
