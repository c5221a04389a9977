"""The causal-LM job's train step (``jlora finetune --task causal-lm``) against the same step in PEFT + transformers.

    python benchmarks/sft_step.py [--dtype float32|bfloat16|both] [--rounds 5] [--steps 2] [--pause 1.0]
                                  [--wait-quiet S] [--quiet-below 0.25] [--threads 2] [--matmul-n 2048]
                                  [--jlora-python PY] [--peft-python .venv-peft/bin/python] [--tiny] [--out DIR]
                                  [--batch 4] [--seq-len 384] [--all-positions] [--quantize nf4|int8|gguf]

The CLI's default causal-LM step: LoRA (r=8, alpha=16, q_proj + v_proj) SFT of SmolLM2-135M-Instruct (the shipped
GGUF) on a fixed batch: the first ``--batch`` packed rows of ``--seq-len`` tokens of the shipped BBC headline task
(encoded to <= 192 tokens), in float32 and bfloat16, each side in its own interpreter (side_by_side.py). jlora
(jlora_worker.py, ``--jlora-python``): built by the CLI's functions (``FinetuneOptions(task="causal-lm", dtype=...)``,
``lm_job.load_model``, ``default_config``, ``init``, ``split``, ``make_loss`` (fused LM-head loss, applied only at
the CLI's ``targets_cap`` positions of largest weight unless ``--all-positions``: the bound the CLI computes over
all training rows), ``make_optimizer``, ``make_train_step(donate=False, weight_fn=target_weight)``), compiled once,
fed the numpy rows; bfloat16 is the CLI's ``--dtype bfloat16``. PEFT (peft_worker.py, ``--peft-python``: torch 2.13
CPU, transformers 5, peft; no jax): the jlora side's weights (``export_merged`` of its model, written as an HF
folder) in ``AutoModelForCausalLM`` (SDPA, train mode) under ``get_peft_model`` (jlora's r / alpha / targets and
lora_a), torch AdamW (weight decay 0.01, the CLI's peak lr, no schedule) on ``--threads`` threads; packing as
jlora's: a (b, 1, q, k) bool mask causal within segments, position_ids, labels -100 off jlora's targets (all
written by the jlora worker); in bfloat16 both the base in bf16 weights and torch.autocast over float32, the
faster being "PEFT bf16". Checked first (else it fails): trainable counts equal, packed torch logits = the
examples' alone (float32), initial losses equal to 1e-4 relative (float32; 3e-2 in bf16). Then the steps and a
matmul probe per side and dtype are alternated (``workers.alternate``, ``--pause`` s before each turn) and
reported as in ``main_job_step.py``: jlora/PEFT per-round ratios in each dtype (all, quiet rounds), median step,
tokens/s (non-padding), FLOPs (torch FlopCounterMode + attention by hand: SDPA's CPU kernel is not counted; for
jlora less the head at the positions its ``targets_cap`` skips, 4 (b s - K) d V) and GFLOP/s, the share of the same side's same-dtype matmul; memory: XLA's compiled analysis of the jlora step
(arguments + temps + outputs), torch's peak live tensor bytes in a step (process RSS would hide allocator caches;
each worker's peak RSS is printed beside it). ``--quantize FMT``: also the CLI's step over the base quantized as
``jlora finetune --quantize FMT`` does (jlora side), alternated with the others (its ratio to the LoRA step per
round). ``--tiny``: a random 2-layer hidden-64 tied Llama, SmolLM2's tokenizer (smoke test). Writes
``<out>/sft_step.json``.
"""
from __future__ import annotations

import argparse
from typing import Any

from side_by_side import DTYPES, Session, add_arguments, build_all, measure, table_lines
from timing import write_result

LOSS_RTOL = 1e-4


def table(result: dict) -> str:
    w = result["workload"]
    line = (f"SFT step: {w['model']} ({w['layers']} layers, hidden {w['hidden']}, vocab {w['vocab']}), batch "
            f"{w['batch']}x{w['seq']} packed ({w['tokens']} tokens, {w['targets']} targets), LoRA r={w['r']} "
            f"alpha={w['alpha']} on {', '.join(w['target_modules'])}, lr {w['lr']}, {result['threads']} torch "
            f"threads, jlora head at {'every position' if result['jlora_targets_cap'] is None else 'the targets only'}"
            + (f"; QLoRA: --quantize {result['quantize']}" if result["quantize"] else ""))
    return "\n".join(table_lines(result, line, ("tokens (non-padding)", w["tokens"])))


def run(args: argparse.Namespace) -> dict[str, Any]:
    spec = {"tiny": args.tiny, "batch": args.batch, "seq_len": args.seq_len, "all_positions": args.all_positions,
            "quantize": args.quantize}
    extra = tuple((f"jlora_qlora:{d}", f"jlora_lora:{d}") for d in DTYPES) if args.quantize else ()
    with Session(args) as s:
        built = build_all(s, "sft", spec, {}, rtol=LOSS_RTOL)
        result = measure(s, built, extra)
    j = built["jlora"]
    result.update(tiny=args.tiny, threads=args.threads, workload=j["workload"], options=j["options"],
                  lora_config=j["lora_config"], jlora_targets_cap=j["targets_cap"], quantize=args.quantize,
                  memory_notes="jlora: XLA's compiled memory analysis, arguments + temps + outputs; torch: live tensor "
                               "storages in one step (params, buffers, optimizer state, batch + the step's peak of new "
                               "ones; not allocator caches or BLAS buffers)")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, rounds=5, steps=2)
    parser.add_argument("--batch", type=int, default=4, help="rows per step (the CLI's --batch)")
    parser.add_argument("--seq-len", type=int, default=384, help="tokens per packed row (the CLI's --seq-len)")
    parser.add_argument("--tiny", action="store_true", help="a random-init 2-layer, hidden-64 Llama (smoke test)")
    parser.add_argument("--all-positions", action="store_true",
                        help="jlora applies the LM head at every position (as PEFT), not only where targets are")
    parser.add_argument("--quantize", choices=("nf4", "int8", "gguf"), default=None,
                        help="also the CLI's QLoRA step (--quantize) over the same batch, alternated with the others")
    args = parser.parse_args()
    args.matmul_n = args.matmul_n or (256 if args.tiny else 2048)
    write_result(args.out, "sft_step", run(args), table)


if __name__ == "__main__":
    main()
