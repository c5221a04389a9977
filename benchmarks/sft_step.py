"""The causal-LM job's train step (``jlora finetune --task causal-lm``) against the same step in PEFT + transformers.

    python benchmarks/sft_step.py [--rounds 7] [--steps 2] [--wait-quiet S] [--quiet-below 0.25] [--threads 2]
                                  [--matmul-n 2048] [--tiny] [--out DIR] [--batch 4] [--seq-len 384] [--all-positions]
                                  [--quantize nf4|int8|gguf]

The CLI's default causal-LM step: LoRA (r=8, alpha=16, q_proj + v_proj) SFT of SmolLM2-135M-Instruct (the shipped
GGUF) on a fixed batch: the first ``--batch`` packed rows of ``--seq-len`` tokens of the shipped BBC headline task
(encoded to <= 192 tokens). jlora: built by the CLI's functions (``load_causal_lm``, ``default_config``, ``init``,
``split``, ``make_loss`` (fused LM-head loss, applied only at the CLI's ``targets_cap`` positions of largest
weight unless ``--all-positions``: the bound the CLI computes over all training rows), ``make_optimizer``, ``make_train_step(donate=False,
weight_fn=target_weight)``), compiled once, fed the numpy rows. PEFT: the same weights (``export_merged``) in
``AutoModelForCausalLM`` (float32, SDPA, train mode) under ``get_peft_model`` (jlora's r / alpha / targets and
lora_a), torch AdamW (weight decay 0.01, the CLI's peak lr, no schedule) on ``--threads`` threads; packing as
jlora's: a (b, 1, q, k) bool mask causal within segments, position_ids, labels -100 off jlora's targets.
Checked first (else it fails): trainable counts equal, packed torch logits = the examples' alone, initial losses
equal to 1e-4 relative. Then both steps and an fp32 matmul probe per framework are alternated
(``timing.alternate``) and reported as in ``main_job_step.py``: jlora/PEFT per-round ratios (all, quiet rounds),
median step, tokens/s (non-padding), FLOPs (torch FlopCounterMode + attention by hand: SDPA's CPU kernel is not
counted) and GFLOP/s; memory: XLA's compiled analysis of the jlora step (arguments + temps + outputs), torch's
peak live tensor bytes in a step (:func:`torch_tensor_peak`; process RSS would hide allocator caches).
``--quantize FMT``: the CLI's step over the base quantized as ``jlora finetune --quantize FMT`` does, alternated
with the others (its ratio to the LoRA step per round). ``--tiny``: a random 2-layer hidden-64 tied Llama, SmolLM2's tokenizer (smoke test). Writes ``<out>/sft_step.json``.
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
from main_job_step import attention_flops
from timing import alternate, alternation_footer, paired, round_medians, spread, summary, write_result

SEED, LOSS_RTOL, LOGITS_ATOL = 0, 1e-4, 2e-3
TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=49152, max_position_embeddings=2048, rope_theta=100000.0, tie_word_embeddings=True,
            bos_token_id=1, eos_token_id=2, pad_token_id=2)
ORDER = ("jlora_lora", "peft_lora", "xla_matmul", "torch_matmul")
SIDES = ("jlora_lora", "peft_lora")


def tiny_model_dir(root: Path) -> Path:
    """A random tied Llama of :data:`TINY`'s shape with SmolLM2's tokenizer: an HF folder, PyTorch-named safetensors."""
    import transformers
    from safetensors.numpy import save_file
    from jlora.hf.llama import FlaxLlamaForCausalLMFixed, read_gguf_tokenizer
    from jlora.hf.names import to_torch_state
    from jlora.hf.shipped import smollm2_gguf_path
    root.mkdir(parents=True)
    config = transformers.LlamaConfig(**TINY)
    model = FlaxLlamaForCausalLMFixed(config, seed=SEED)
    save_file({k: np.asarray(v) for k, v in to_torch_state(model.params).items()}, str(root / "model.safetensors"),
              metadata={"format": "pt"})
    config.to_json_file(str(root / "config.json"))
    read_gguf_tokenizer(smollm2_gguf_path()).save_pretrained(str(root))
    return root


def prepare_jlora(lm: Any, options: Any, data: dict[str, np.ndarray], cap: int | None) -> tuple[Any, dict, Any, Any]:
    """``(run, info, config, lora)``: the CLI's step, compiled once; ``info["loss0"]``: the loss at the initial
    adapter (a step whose update is dropped)."""
    import jlora
    from jlora.app import causal_lm as clm
    from jlora.app.finetune import make_optimizer
    config = jlora.hf.default_config(lm.model, r=options.rank, lora_alpha=options.alpha)
    lora = jlora.init(jax.random.key(options.seed), lm.params, config)
    trainable, frozen = jlora.split(lm.params, lora, config)
    tx = make_optimizer(options, config)
    opt_state = tx.init(trainable)
    step_fn = jlora.make_train_step(clm.make_loss(lm, jlora.apply(lm.model, config), targets_cap=cap), tx, donate=False,
                                    accumulate=options.accumulate, weight_fn=clm.target_weight)
    lowered = step_fn.lower(trainable, opt_state, frozen, data)
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    memory = {k: int(getattr(mem, f"{k}_size_in_bytes", 0) or 0) for k in ("argument", "output", "alias", "temp")} \
        if mem is not None else {}
    box = {"t": trainable, "o": opt_state}

    def run():
        box["t"], box["o"], loss = compiled(box["t"], box["o"], frozen, data)
        return loss
    info = {"trainable": int(sum(x.size for x in jax.tree_util.tree_leaves(trainable))), "compile_s": compile_s,
            "loss0": float(compiled(trainable, opt_state, frozen, data)[2]), "memory": memory,
            "xla_flops": float(cost["flops"]) if cost and "flops" in cost else None,
            "peak_bytes": sum(memory.get(k, 0) for k in ("argument", "temp", "output")) - memory.get("alias", 0)}
    return run, info, config, lora


def torch_inputs(data: dict[str, np.ndarray]) -> dict[str, Any]:
    """jlora's packed rows for transformers: a (b, 1, q, k) bool mask (True: attend), causal within a segment;
    ``position_ids``; ``labels`` -100 where jlora's target weight is 0 (HF predicts labels[t + 1] at t)."""
    import torch
    import jlora
    ids, seg = data["input_ids"].astype(np.int64), data["segment_ids"]
    causal = np.tril(np.ones((ids.shape[1],) * 2, bool))
    mask = causal[None] & (seg[:, :, None] == seg[:, None, :])  # padding (segment 0) attends only padding
    weights = np.asarray(jlora.next_token_targets(data["input_ids"], data["weights"], seg)[1])
    labels = np.full_like(ids, -100)
    labels[:, 1:] = np.where(weights[:, :-1] > 0, ids[:, 1:], -100)
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask[:, None]),
            "position_ids": torch.from_numpy(data["positions"].astype(np.int64)), "labels": torch.from_numpy(labels)}


def torch_tensor_peak(run: Any, existing: list) -> dict[str, int]:
    """Peak bytes of live tensor storages in one ``run()``: ``existing``'s (params, optimizer state, batch) plus
    the peak of those the step creates (grads, activations, temporaries; not allocator or BLAS buffers)."""
    import weakref
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    ptr = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
    base = sum({ptr(t): t.untyped_storage().nbytes() for t in existing}.values())

    class Live(TorchDispatchMode):
        live = peak = 0
        refs: dict = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {ptr(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            for t in tree_leaves(out):
                st = t.untyped_storage() if isinstance(t, torch.Tensor) else None
                if st is None or st.data_ptr() in inputs or st.data_ptr() in self.refs or not st.nbytes():
                    continue  # in place, a view, or seen
                key, size = st.data_ptr(), st.nbytes()
                self.live += size
                self.peak = max(self.peak, self.live)
                self.refs[key] = weakref.ref(st, lambda _, k=key, n=size: self.free(k, n))
            return out

        def free(self, key, size):
            self.live, _ = self.live - size, self.refs.pop(key, None)
    with Live() as live:
        run()
    return {"existing": base, "step_peak": live.peak, "total": base + live.peak}


def prepare_peft(folder: Path, config: Any, lora: Any, data: dict[str, np.ndarray], threads: int,
                 lr: float) -> tuple[Any, dict]:
    """``(run, info)``: the PEFT step on the exported weights with jlora's lora_a; checks packing (row 0's logits
    = its examples' alone), then runs one step under FlopCounterMode and one to track tensor memory."""
    import torch
    import transformers
    from peft import LoraConfig as PeftConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode
    from jlora.tree import flatten
    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32,
                                                             attn_implementation="sdpa")
    model = get_peft_model(base, PeftConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                            target_modules=list(config.target_modules), bias=config.bias,
                                            use_rslora=config.use_rslora)).train()
    named = dict(model.named_parameters())
    with torch.no_grad():  # jlora's lora_a (in, r) -> PEFT's lora_A (r, in); both lora_b are 0
        copied = [named[f"base_model.model.{'.'.join(k[:-1])}.lora_A.default.weight"].copy_(
            torch.from_numpy(np.asarray(a).T.copy())) for k, a in flatten(lora).items() if k[-1] == "lora_a"]
    assert len(copied) == sum(1 for n in named if ".lora_A." in n), "jlora's adapters do not cover PEFT's"
    inputs = torch_inputs(data)
    with torch.no_grad():
        out = model(**inputs)
        seg, logits_diff = data["segment_ids"][0], 0.0
        for s in np.unique(seg[seg > 0]):
            where = torch.from_numpy(np.flatnonzero(seg == s))
            alone = model(input_ids=inputs["input_ids"][:1, where]).logits[0]
            logits_diff = max(logits_diff, float((alone - out.logits[0, where]).abs().max()))
    if not logits_diff <= LOGITS_ATOL:
        raise SystemExit(f"the 4-D packing mask does not isolate examples in torch: max |logits diff| {logits_diff}")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)

    def run():
        model(**inputs).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    counted, by_module = float(counter.get_total_flops()), counter.get_flop_counts()
    # no formula for SDPA's CPU flash kernel; the math fallback's bmm would be counted (rotary's bmm is no attention)
    attention = 0.0 if any("attention" in str(op) or (m.endswith("self_attn") and "bmm" in str(op))
                           for m, ops in by_module.items() for op in ops) else \
        attention_flops(base.config, *inputs["input_ids"].shape)
    tensors = torch_tensor_peak(run, [*model.parameters(), *model.buffers(), *inputs.values(), *(
        v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor))])
    return run, {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                 "loss0": float(out.loss), "packed_logits_max_abs_diff": logits_diff, "torch_flops": counted,
                 "attention_flops_added": attention, "matmul_flops": counted + attention,
                 "counted_ops": sorted({str(o) for ops in by_module.values() for o in ops}),
                 "attn_implementation": getattr(base.config, "_attn_implementation", None),
                 "peak_tensors": tensors, "peak_bytes": tensors["total"]}


def table(result: dict) -> str:
    sides, alt, w, eq = [result[s] for s in SIDES], result["alternation"], result["workload"], result["equivalence"]
    quiet, mm = alt["ratios_quiet"], alt["matmul"]
    j, mem, t = result["jlora_lora"], result["jlora_lora"]["memory"], result["peft_lora"]["peak_tensors"]
    mib = lambda b: "n/a" if b is None else f"{b / 2**20:.1f}"  # noqa: E731
    row = md_row
    lines = [*header_lines(result),
             f"SFT step: {w['model']} ({w['layers']} layers, hidden {w['hidden']}, vocab {w['vocab']}), batch "
             f"{w['batch']}x{w['seq']} packed ({w['tokens']} tokens, {w['targets']} targets), LoRA r={w['r']} "
             f"alpha={w['alpha']} on {', '.join(w['target_modules'])}, lr {w['lr']}, {result['threads']} torch "
             f"threads, {platform.processor() or platform.machine()}, jax {jax.__version__}",
             f"same step: loss at the initial adapter jlora {eq['jlora_loss']:.6f}, torch {eq['torch_loss']:.6f} "
             f"(relative difference {eq['relative_diff']:.1e}); torch packed vs alone logits max |diff| "
             f"{eq['packed_logits_max_abs_diff']:.1e}",
             "| train step | jlora LoRA (CLI step) | PEFT LoRA |", "| --- | --- | --- |",
             row("trainable params", [f"{r['trainable']:,}" for r in sides]),
             row(f"median step (s) (min–max of round medians), {alt['rounds']} x {alt['steps_per_round']} steps",
                 [f"{r['step_s']:.3f} ({r['step_s_min']:.3f}–{r['step_s_max']:.3f})" for r in sides]),
             row("tokens/s (non-padding, median step)", [f"{r['tokens_per_s']:.0f}" for r in sides]),
             row("XLA compile (s); first call of the alternation (s)",
                 [f"{j['compile_s']:.1f}; {j['first_step_s']:.2f}", f"–; {result['peft_lora']['first_step_s']:.2f}"]),
             row("step GFLOP: matmuls (torch FlopCounterMode + attention)", [f"{r['step_flops'] / 1e9:.1f}"
                                                                             for r in sides]),
             row("GFLOP/s, median (min–max)", [spread(r["flop_per_s"], ".0f", 1e9) for r in sides]),
             row(f"share of one {mm['n']}² fp32 matmul's FLOP/s (XLA / torch)", [spread(r["of_matmul"])
                                                                                for r in sides]),
             *([row(f"quiet rounds ({len(alt['quiet_rounds'])}): median step (s)",
                    [f"{r['quiet']['step_s']['median']:.3f}" for r in sides])] if quiet else []),
             row("peak memory (MiB): XLA arguments + temps + outputs / torch live tensors (existing + step)",
                 [f"{mib(j['peak_bytes'])} ({mib(mem.get('argument'))} + {mib(mem.get('temp'))} + "
                  f"{mib(mem.get('output'))})", f"{mib(t['total'])} ({mib(t['existing'])} + {mib(t['step_peak'])})"]),
             "",
             *alternation_footer(alt)]
    if "jlora_qlora" in result:
        q, qm = result["jlora_qlora"], result["jlora_qlora"]["memory"]
        ratio = alt["ratios"]["jlora_qlora/jlora_lora"]
        lines += ["", f"QLoRA (the CLI's --quantize {result['qlora']['quantize']}): median step {q['step_s']:.3f} s "
                  f"({q['tokens_per_s']:.0f} tokens/s); per round jlora QLoRA / jlora LoRA {spread(ratio)}; loss at the "
                  f"initial adapter {q['loss0']:.6f}; XLA arguments + temps {mib(qm.get('argument'))} + "
                  f"{mib(qm.get('temp'))} MiB (LoRA {mib(mem.get('argument'))} + {mib(mem.get('temp'))})"]
    return "\n".join(lines)


def measure(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    import jlora
    from jlora.app import causal_lm as clm
    from jlora.app.finetune import TASK_DEFAULTS, FinetuneOptions
    from jlora.app.sft_data import bbc_headlines, encode
    options = FinetuneOptions(task="causal-lm", batch=args.batch, seq_len=args.seq_len, seed=SEED,  # CLI defaults
                              max_length=min(TASK_DEFAULTS["causal-lm"]["max_length"], args.seq_len)).resolved()
    model = str(tiny_model_dir(root / "tiny") if args.tiny else "smollm2")  # the CLI's --model
    lm = clm.load_causal_lm(model, max_positions=max(options.seq_len, options.max_length + options.max_new_tokens))
    tok = lm.tokenizer
    rows = clm.rows([encode(tok, e, options.max_length) for e in bbc_headlines()], options.seq_len,
                    packed=options.pack, pad_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    data = {k: v[:options.batch] for k, v in rows.items()}  # the same batch every step
    cap = None if args.all_positions else clm.targets_cap(rows, options.batch // options.accumulate)  # as the CLI
    j_run, j_info, config, lora = prepare_jlora(lm, options, data, cap)
    folder = jlora.hf.export_merged(root / "merged", lm.model, lm.params, lora, config, tokenizer=tok)
    p_run, p_info = prepare_peft(folder, config, lora, data, args.threads, options.lr)
    rel = abs(j_info["loss0"] - p_info["loss0"]) / abs(p_info["loss0"])
    print(f"trainable params: jlora {j_info['trainable']:,}, PEFT {p_info['trainable']:,}; loss at the initial "
          f"adapter: jlora {j_info['loss0']:.6f}, torch {p_info['loss0']:.6f} (relative difference {rel:.2e})")
    if j_info["trainable"] != p_info["trainable"] or not rel <= LOSS_RTOL:
        raise SystemExit(f"not the same step: trainable counts or losses differ (loss rtol {LOSS_RTOL})")
    probes, mm_flops = matmul_probes(args.matmul_n, args.threads)
    runs = {"jlora_lora": j_run, "peft_lora": p_run, **probes}
    runs = {name: runs[name] for name in ORDER}
    q_info = None
    if args.quantize:  # the CLI's --quantize step: the same batch and adapters over a quantized base
        lm_q = clm.load_causal_lm(model, max_positions=max(options.seq_len, options.max_length + options.max_new_tokens),
                                  quantize=args.quantize)
        q_run, q_info, _, _ = prepare_jlora(lm_q, options, data, cap)
        runs = {"jlora_qlora": q_run, **runs}
    wait = (lambda: wait_quiet(args.quiet_below, args.wait_quiet)) if args.wait_quiet > 0 else None
    load_before = loadavg()
    alt = alternate(runs, args.rounds, args.steps, sample_load=CpuLoad().sample, before_round=wait)
    load_after = loadavg()
    mm = {name: [mm_flops / t for t in round_medians(alt, name)] for name in probes}
    quiet = [i for i, x in enumerate(alt["load"]) if x and x["other_cores"] < args.quiet_below]
    pick = lambda values: [values[i] for i in quiet]  # noqa: E731
    flops, tokens, c = p_info["matmul_flops"], int((data["segment_ids"] > 0).sum()), lm.model.config
    result: dict[str, Any] = {
        "tiny": args.tiny, "threads": args.threads, "lora_config": config.to_dict(),
        "options": dataclasses.asdict(options),
        "jlora_targets_cap": cap,
        "equivalence": {"jlora_loss": j_info["loss0"], "torch_loss": p_info["loss0"], "relative_diff": rel,
                        "rtol": LOSS_RTOL, "packed_logits_max_abs_diff": p_info["packed_logits_max_abs_diff"]},
        "workload": {"model": "tiny random-init Llama" if args.tiny else "SmolLM2-135M-Instruct (shipped GGUF)",
                     "source": lm.source, "layers": c.num_hidden_layers, "hidden": c.hidden_size,
                     "vocab": c.vocab_size, "batch": options.batch, "seq": options.seq_len, "tokens": tokens,
                     "targets": int((torch_inputs(data)["labels"] >= 0).sum()), "r": config.r,
                     "alpha": config.lora_alpha, "target_modules": list(config.target_modules), "lr": options.lr},
        "memory_notes": "peak_bytes: jlora: XLA's compiled memory analysis, arguments + temps + outputs - aliased; "
                        "torch: live tensor storages in one step (params, buffers, optimizer state, batch + the "
                        "step's peak of new ones; not allocator caches or BLAS buffers)"}
    for name, info in (("jlora_lora", j_info), ("peft_lora", p_info), *((("jlora_qlora", q_info),) if q_info else ())):
        per_round = round_medians(alt, name)
        probe = mm["xla_matmul" if name.startswith("jlora") else "torch_matmul"]
        step_s = statistics.median(per_round)
        r = {**info, "first_step_s": alt["first_s"][name], "step_s": step_s, "round_s": per_round,
             "step_s_min": min(per_round), "step_s_max": max(per_round), "tokens_per_s": tokens / step_s,
             "step_flops": flops, "flop_per_s": summary([flops / t for t in per_round]),
             "of_matmul": summary([flops / t / p for t, p in zip(per_round, probe)])}
        r["quiet"] = {"step_s": summary(pick(per_round)), "flop_per_s": summary(pick(r["flop_per_s"]["per_round"])),
                      "of_matmul": summary(pick(r["of_matmul"]["per_round"]))} if quiet else None
        result[name] = r
    ratios = {f"{a}/{b}": paired(alt, a, b) for a, b in (SIDES, ("xla_matmul", "torch_matmul"),
                                                         *((("jlora_qlora", "jlora_lora"),) if q_info else ()))}
    if q_info:
        result["qlora"] = {"quantize": args.quantize, "loss0": q_info["loss0"],
                           "base_bytes": q_info["memory"].get("argument")}
    result["alternation"] = {
        "rounds": args.rounds, "steps_per_round": args.steps, "order_first_round": list(runs),
        "times_s": alt["rounds"], "order": alt["order"], "load": alt["load"], "waited": alt["before"],
        "ratios": ratios,
        "ratios_quiet": {k: summary(pick(v["per_round"])) for k, v in ratios.items()} if quiet else None,
        "quiet_below_cores": args.quiet_below, "wait_quiet_s": args.wait_quiet, "quiet_rounds": quiet,
        "other_cores": summary([x["other_cores"] for x in alt["load"] if x]),
        "matmul": {"n": args.matmul_n, "flops": mm_flops, **{k: summary(v) for k, v in mm.items()},
                   "quiet": {k: summary(pick(v)) for k, v in mm.items()} if quiet else None}}
    result["machine"] = {"info": machine_info(), "loadavg_before": load_before, "loadavg_after": load_after}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default, say in (("--rounds", 7, "rounds of alternation"), ("--steps", 2, "timed steps per round"),
                               ("--threads", 2, "torch threads"), ("--batch", 4, "rows per step (the CLI's --batch)"),
                               ("--seq-len", 384, "tokens per packed row (the CLI's --seq-len)")):
        parser.add_argument(flag, type=int, default=default, help=say)
    parser.add_argument("--matmul-n", type=int, help="size of the fp32 matmul probe (default 2048; 256 with --tiny)")
    parser.add_argument("--quiet-below", type=float, default=0.25,
                        help="ratios also over the rounds in which other processes took fewer cores than this")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each round, wait up to this long for a quiet machine (0: do not wait)")
    parser.add_argument("--tiny", action="store_true", help="a random-init 2-layer, hidden-64 Llama (smoke test)")
    parser.add_argument("--all-positions", action="store_true",
                        help="jlora applies the LM head at every position (as PEFT), not only where targets are")
    parser.add_argument("--quantize", choices=("nf4", "int8", "gguf"), default=None,
                        help="also the CLI's QLoRA step (--quantize) over the same batch, alternated with the others")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    args.matmul_n = args.matmul_n or (256 if args.tiny else 2048)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args, Path(tmp))
    write_result(args.out, "sft_step", result, table)


if __name__ == "__main__":
    main()
