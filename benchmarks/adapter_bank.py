"""Many LoRA adapters in one generation batch: jlora's adapter bank against one merged / unmerged adapter
and against PEFT's mixed-batch generate (issue 14).

    python benchmarks/adapter_bank.py [--models smollm2,w1] [--rounds 3] [--batches 16,64] [--prompt-tokens 32]
                                      [--new-tokens 32] [--skip-peft] [--skip-layer] [--skip-memory]
                                      [--layer-steps 20] [--wait-quiet S] [--threads 2] [--quick] [--out DIR]

Models: ``smollm2`` = SmolLM2-135M from the shipped GGUF (30 layers, hidden 576, 9 heads / 3 kv heads, tied
head, vocab 49152); ``w1`` = a random-init Llama of W1's size (the GPT-2 W1 of compare_peft.py as a Llama:
4 layers, hidden 256, 4 heads, MLP 1024, vocab 50257, tied head). ``--quick``: a random 2-layer hidden-64
Llama, batches 4 and 16, 8 prompt / 4 new tokens, 1 round, a 2-layer micro-benchmark (smoke test).

Workload, per model and batch B: B prompts of ``--prompt-tokens`` (32) random token ids, no padding,
``--new-tokens`` (32) new tokens greedy, every step run (jlora ``eos_token_id=None``; PEFT
``min_new_tokens = max_new_tokens``). 64 adapters r=8, alpha=16 on q_proj, v_proj: lora_a as ``jlora.init``
(a different key each), lora_b ~ N(0, 0.02^2) (non-zero: every adapter changes the model). Sides:

* jlora ``merged``: every row on adapter 0 merged into the params (``jlora.merge``; the ceiling);
  ``unmerged``: adapter 0 as ``lora=`` (every row); ``mixed8`` / ``mixed64``: a 64-slot bank
  (``jlora.bank.stack``), row b on adapter ``b % 8`` / ``b % 64`` (``bank=, adapter_ids=``; one sampler
  compiled for both: only the ids differ);
* PEFT 0.21 (torch CPU, ``--threads``): ``peft_merged``: adapter 0 merged by PEFT (``merge_and_unload``);
  ``peft_mixed8`` / ``peft_mixed64``: all 64 adapters loaded (``add_adapter``, jlora's factors copied in),
  ``generate(..., adapter_names=[one name per row])``. The torch model is jlora's base weights
  (``jlora.hf.export_merged`` of a zero adapter, as sft_step.py builds PEFT's model), SDPA attention.

Each variant also runs with ``max_new_tokens=1`` (``@1``: the prefill, the cache filled and the first
token chosen). Every run is called twice untimed (compile / warm; its tokens checked, below), then all are
alternated in this one process (``timing.alternate``: ``--rounds`` rounds, one call each per round, the
order rotated each round). Per round: tokens/s = B * new / T(new); prefill = T(1); decode step =
(T(new) - T(1)) / (new - 1) (the cache is 1 + prompt long in T(1) and new + prompt in T(new): the prefill
attends over a slightly longer cache in T(new)). Ratios (of tokens/s) are taken per round, reported as
median (min–max) over the rounds. Checks (fraction of rows with identical tokens, not asserted):
unmerged = merged, mixed rows on adapter 0 = merged, PEFT = jlora per variant, and the share of mixed rows
on other adapters that differ from adapter 0's (the adapters matter).

Memory: ``bank.nbytes()`` of the 64-slot bank and one adapter's bytes against the base params; XLA's
memory analysis of jlora's compiled sampler (``jlora.generate``'s jitted function lowered at the largest
batch) for merged, unmerged and the bank. ``--skip-layer`` skips the layer micro-benchmark
(bank_layer.py: gather vs ``jax.lax.ragged_dot`` vs one-hot einsum). Writes ``<out>/adapter_bank.json``.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jlora
from jlora import bank as jb
from bank_layer import layer_bench, layer_rows
from machine import CpuLoad, header_lines, loadavg, machine_info, md_row, wait_quiet
from timing import alternate, round_medians, spread, summary, write_result

R, ALPHA, TARGETS, B_STD, SLOTS, SPREADS = 8, 16, ("q_proj", "v_proj"), 0.02, 64, (8, 64)
W1 = dict(vocab_size=50257, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
          num_key_value_heads=4, tie_word_embeddings=True)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True)
MiB = 2 ** 20


def load(name: str, positions: int) -> tuple[Any, Any, str]:
    """(Flax model, params, description) of ``smollm2`` (the shipped GGUF), ``w1`` or ``tiny`` (random init)."""
    if name == "smollm2":
        from jlora.app.causal_lm import load_causal_lm
        lm = load_causal_lm("smollm2", max_positions=positions)
        return lm.model, lm.params, "SmolLM2-135M (shipped GGUF)"
    import transformers
    from jlora.hf.llama import FlaxLlamaForCausalLMFixed
    spec = {"w1": W1, "tiny": TINY}[name]
    config = transformers.LlamaConfig(**spec, max_position_embeddings=positions, bos_token_id=1, eos_token_id=2)
    model = FlaxLlamaForCausalLMFixed(config, seed=0)
    return model, model.params, f"random-init Llama {name} " + ", ".join(f"{k}={v}" for k, v in spec.items())


def adapters(params: Any, config: jlora.LoraConfig, n: int) -> list[Any]:
    """``n`` adapters: lora_a as jlora.init (key i), lora_b ~ N(0, B_STD^2) (key 1000 + i)."""
    out = []
    for i in range(n):
        lora = jlora.init(jax.random.key(i), params, config)
        keys = iter(jax.random.split(jax.random.key(1000 + i), len(jax.tree_util.tree_leaves(lora))))
        out.append(jax.tree_util.tree_map_with_path(
            lambda path, x: B_STD * jax.random.normal(next(keys), x.shape, x.dtype)
            if "lora_b" in jax.tree_util.keystr(path) else x, lora))
    return out


def jlora_runs(model: Any, params: Any, loras: list, config: jlora.LoraConfig, bank: Any, merged: Any,
               prompts: np.ndarray, new: int) -> dict[str, Any]:
    """``{name: run}`` of jlora's variants at ``new`` and at 1 new token (``name@1``)."""
    b = prompts.shape[0]
    runs = {}
    for n, suffix in ((new, ""), (1, "@1")):
        gen = lambda p, n=n, **kw: jlora.generate(model, p, prompts, max_new_tokens=n, eos_token_id=None, **kw)  # noqa: E731
        runs["jlora_merged" + suffix] = lambda gen=gen: gen(merged)
        runs["jlora_unmerged" + suffix] = lambda gen=gen: gen(params, lora=loras[0], config=config)
        for k in SPREADS:
            ids = np.arange(b, dtype=np.int32) % k
            runs[f"jlora_mixed{k}{suffix}"] = lambda gen=gen, ids=ids: gen(params, bank=bank, adapter_ids=ids)
    return runs


def peft_models(model: Any, params: Any, loras: list, config: jlora.LoraConfig, threads: int, root: Path) -> tuple:
    """(adapter 0 merged by PEFT, a PEFT model with every adapter loaded as ``a{i}``), on jlora's base weights."""
    import torch
    import transformers
    from peft import LoraConfig as PeftConfig, get_peft_model
    from jlora.tree import flatten
    torch.set_num_threads(threads)
    zero = jax.tree_util.tree_map(jnp.zeros_like, loras[0])  # merged with zeros: the base weights, exactly
    folder = jlora.hf.export_merged(root / "base", model, params, zero, config)
    base = lambda: transformers.AutoModelForCausalLM.from_pretrained(  # noqa: E731
        folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    pcfg = PeftConfig(r=config.r, lora_alpha=config.lora_alpha, target_modules=list(config.target_modules),
                      lora_dropout=0.0)

    def copy_in(peft_model: Any, count: int) -> Any:
        named = dict(peft_model.named_parameters())
        with torch.no_grad():
            for i, lora in enumerate(loras[:count]):
                for k, v in flatten(lora).items():
                    kind = {"lora_a": "lora_A", "lora_b": "lora_B"}[k[-1]]
                    named[f"base_model.model.{'.'.join(k[:-1])}.{kind}.a{i}.weight"].copy_(
                        torch.from_numpy(np.asarray(v).T.copy()))
        return peft_model.eval()
    mixed = get_peft_model(base(), pcfg, adapter_name="a0")
    for i in range(1, len(loras)):
        mixed.add_adapter(f"a{i}", pcfg)
    merged = copy_in(get_peft_model(base(), pcfg, adapter_name="a0"), 1).merge_and_unload().eval()
    return merged, copy_in(mixed, len(loras))


def peft_runs(merged: Any, mixed: Any, prompts: np.ndarray, new: int) -> dict[str, Any]:
    """PEFT's variants: ``peft_merged`` and ``peft_mixed{k}`` (``adapter_names``: row b on ``a{b % k}``)."""
    import torch
    ids = torch.from_numpy(prompts.astype(np.int64))
    mask, b, p = torch.ones_like(ids), prompts.shape[0], prompts.shape[1]
    pad = merged.config.eos_token_id if merged.config.pad_token_id is None else merged.config.pad_token_id

    def gen(m: Any, n: int, names: list[str] | None = None) -> np.ndarray:
        with torch.inference_mode():
            out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=pad, **({"adapter_names": names} if names else {}))
        return out[:, p:].numpy()
    runs = {}
    for n, suffix in ((new, ""), (1, "@1")):
        runs["peft_merged" + suffix] = lambda n=n: gen(merged, n)
        for k in SPREADS:
            names = [f"a{i % k}" for i in range(b)]
            runs[f"peft_mixed{k}{suffix}"] = lambda n=n, names=names: gen(mixed, n, names)
    return runs


def checks(tokens: dict[str, np.ndarray], b: int) -> dict[str, float]:
    """Fractions of rows with identical tokens (see the module docstring)."""
    same = lambda x, y: float(np.mean(np.all(x == y, axis=1)))  # noqa: E731
    m = tokens["jlora_merged"]
    out = {"unmerged=merged": same(tokens["jlora_unmerged"], m)}
    for k in SPREADS:
        ids, mixed = np.arange(b) % k, tokens[f"jlora_mixed{k}"]
        out[f"mixed{k} rows on adapter 0=merged"] = same(mixed[ids == 0], m[ids == 0])
        if (ids != 0).any():
            out[f"mixed{k} rows on other adapters differ from adapter 0's"] = 1 - same(mixed[ids != 0], m[ids != 0])
    for name in [n for n in tokens if n.startswith("peft_") and "@" not in n]:
        out[f"{name}=jlora_{name[5:]}"] = same(tokens[name], tokens[f"jlora_{name[5:]}"])
    return out


def sampler_memory(model: Any, params: Any, lora: Any, config: Any, bank: Any, merged: Any, prompts: np.ndarray,
                   new: int) -> dict[str, dict[str, int]]:
    """XLA's memory analysis of jlora.generate's compiled sampler (argument / temp / output bytes) per variant."""
    from jlora.generate import BANKED, _compiled
    ids = jnp.asarray(prompts, jnp.int32)
    rows = jnp.arange(prompts.shape[0], dtype=jnp.int32) % SLOTS
    out = {}
    for name, (cfg, p, extra) in {"merged": (None, merged, None), "unmerged": (config, params, lora),
                                  "bank": (BANKED, params, (bank, rows))}.items():
        start = time.perf_counter()
        compiled = _compiled(model, cfg).lower(p, extra, ids, jnp.ones_like(ids), jnp.float32(1), jnp.float32(1), None,
                                               max_new_tokens=new, greedy=True, eos=(), pad=0,
                                               return_logits=False).compile()
        m = compiled.memory_analysis()
        out[name] = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "temp", "output", "alias")}
        out[name]["compile_s"] = time.perf_counter() - start
    return out


def measure_model(args: argparse.Namespace, name: str, root: Path) -> dict[str, Any]:
    positions = args.prompt_tokens + args.new_tokens
    model, params, described = load(name, max(128, positions))
    config = jlora.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS)
    loras = adapters(params, config, SLOTS)
    bank = jb.stack([(lora, config) for lora in loras], params, size=SLOTS)
    merged = jlora.merge(params, loras[0], config)
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
    out: dict[str, Any] = {"model": described, "layers": model.config.num_hidden_layers,
                           "hidden": model.config.hidden_size, "vocab": model.config.vocab_size,
                           "bytes": {"base_params": nbytes(params), "adapter": nbytes(loras[0]),
                                     "bank": bank.nbytes(), "bank_slots": SLOTS}, "batches": {}}
    torch_models = None if args.skip_peft else peft_models(model, params, loras, config, args.threads, root)
    rng = np.random.default_rng(0)
    for b in args.batches:
        prompts = rng.integers(3, model.config.vocab_size, (b, args.prompt_tokens)).astype(np.int32)
        runs = jlora_runs(model, params, loras, config, bank, merged, prompts, args.new_tokens)
        if not args.skip_peft:
            runs.update(peft_runs(*torch_models, prompts, args.new_tokens))
        first, tokens = {}, {}
        for v, run in runs.items():  # compile / warm; the tokens for the checks
            start = time.perf_counter()
            tokens[v] = np.asarray(jax.block_until_ready(run()))
            first[v] = time.perf_counter() - start
        wait = (lambda: wait_quiet(args.quiet_below, args.wait_quiet)) if args.wait_quiet > 0 else None
        alt = alternate(runs, args.rounds, 1, warmup=1, sample_load=CpuLoad().sample, before_round=wait)
        secs = {v: round_medians(alt, v) for v in runs}
        tps = {v: [b * args.new_tokens / t for t in secs[v]] for v in runs if "@" not in v}
        r: dict[str, Any] = {"first_call_s": first, "warm_call_s": alt["first_s"], "round_s": secs,
                             "order": alt["order"], "load": alt["load"], "waited": alt["before"],
                             "other_cores": summary([x["other_cores"] for x in alt["load"] if x]),
                             "checks": checks(tokens, b), "variants": {}}
        for v in tps:
            pre = secs[f"{v}@1"]
            r["variants"][v] = {"tokens_per_s": summary(tps[v]), "generate_s": summary(secs[v]),
                                "prefill_s": summary(pre), "decode_step_s": summary(
                                    [(t - t1) / max(args.new_tokens - 1, 1) for t, t1 in zip(secs[v], pre)])}
        pairs = [(f"jlora_mixed{SPREADS[-1]}", "jlora_merged"), (f"jlora_mixed{SPREADS[0]}", "jlora_merged"),
                 ("jlora_unmerged", "jlora_merged")]
        if not args.skip_peft:
            pairs += [(f"jlora_mixed{k}", f"peft_mixed{k}") for k in SPREADS]
            pairs += [("jlora_merged", "peft_merged"), (f"peft_mixed{SPREADS[-1]}", "peft_merged")]
        r["ratios"] = {f"{a}/{c}": summary([x / y for x, y in zip(tps[a], tps[c])]) for a, c in pairs}
        out["batches"][str(b)] = r
    if not args.skip_memory:
        prompts = np.ones((max(args.batches), args.prompt_tokens), np.int32)
        out["sampler_memory"] = {"batch": max(args.batches), **sampler_memory(
            model, params, loras[0], config, bank, merged, prompts, args.new_tokens)}
    return out


def model_table(name: str, m: dict[str, Any], args: dict[str, Any]) -> list[str]:
    by = m["bytes"]
    lines = ["", f"### {name}: {m['model']} ({m['layers']} layers, hidden {m['hidden']}, vocab {m['vocab']})",
             f"r={R}, alpha={ALPHA} on {', '.join(TARGETS)}; {args['prompt_tokens']} prompt tokens, "
             f"{args['new_tokens']} new (greedy, every step run); bank of {by['bank_slots']} slots"]
    for b, r in m["batches"].items():
        vs = r["variants"]
        lines += ["", f"batch {b}: median (min–max) over {args['rounds']} alternated rounds; prefill = T(1 new "
                  f"token), decode step = (T({args['new_tokens']}) - T(1)) / {args['new_tokens'] - 1}, per round; "
                  "the mixed variants share one compiled sampler",
                  "| variant | tokens/s | generate (s) | prefill (ms) | decode step (ms) | first call (s): compile "
                  "+ run |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [md_row(v, [spread(x["tokens_per_s"], ".0f"), spread(x["generate_s"], ".3f"),
                             spread(x["prefill_s"], ".1f", 1e-3), spread(x["decode_step_s"], ".2f", 1e-3),
                             f"{r['first_call_s'][v]:.1f}"]) for v, x in vs.items()]
        lines += ["", "| tokens/s ratio a / b (> 1: a faster), per round | median (min–max) | per round |",
                  "| --- | --- | --- |"]
        lines += [md_row(k, [spread(x), " ".join(f"{y:.2f}" for y in x["per_round"])]) for k, x in r["ratios"].items()]
        other = r["other_cores"]
        lines.append("checks (rows with identical tokens): "
                     + "; ".join(f"{k} {v:.2f}" for k, v in r["checks"].items())
                     + (f"; other processes' CPU (cores) median {other['median']:.2f}, max {other['max']:.2f}"
                        if other else ""))
    mib = lambda x: f"{x / MiB:.1f}"  # noqa: E731
    lines.append(f"\nbytes: base params {mib(by['base_params'])} MiB; one adapter {mib(by['adapter'])} MiB; "
                 f"{by['bank_slots']}-slot bank (bank.nbytes()) {mib(by['bank'])} MiB = "
                 f"{by['bank'] / by['base_params']:.3f} of the base")
    if "sampler_memory" in m:
        sm = m["sampler_memory"]
        lines += [f"XLA memory analysis of the compiled sampler at batch {sm['batch']} (MiB)",
                  "| sampler | arguments | temps | output | arguments + temps | lower + compile (s; ~0: jit's cache) |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [md_row(v, [mib(sm[v]["argument"]), mib(sm[v]["temp"]), mib(sm[v]["output"]),
                             mib(sm[v]["argument"] + sm[v]["temp"]), f"{sm[v]['compile_s']:.1f}"])
                  for v in ("merged", "unmerged", "bank")]
    return lines


def table(result: dict[str, Any]) -> str:
    lines = [*header_lines(result), f"torch threads {result['args']['threads']} (PEFT); jax {jax.__version__}"]
    for name, m in result["models"].items():
        lines += model_table(name, m, result["args"])
    if result.get("layer"):
        lines += ["", *layer_rows(result["layer"])]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,w1", help="comma-separated: smollm2, w1 (tiny with --quick)")
    parser.add_argument("--batches", default="16,64", help="comma-separated batch sizes")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of alternation (generation and layer)")
    parser.add_argument("--layer-steps", type=int, default=20, help="layer micro-benchmark: calls per round")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--skip-layer", action="store_true", help="skip the layer micro-benchmark")
    parser.add_argument("--skip-memory", action="store_true", help="skip the compiled sampler's memory analysis")
    parser.add_argument("--quiet-below", type=float, default=0.25)
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each round, wait up to this long for a quiet machine (0: do not wait)")
    parser.add_argument("--quick", action="store_true", help="tiny model and sizes, 1 round (smoke test)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/issue14"))
    args = parser.parse_args()
    if args.quick:
        args.models, args.batches, args.prompt_tokens, args.new_tokens = "tiny", "4,16", 8, 4
        args.rounds, args.layer_steps = 1, 3
    args.batches = [int(b) for b in args.batches.split(",")]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if unknown := set(models) - {"smollm2", "w1", "tiny"}:
        parser.error(f"--models: unknown {sorted(unknown)} (smollm2, w1, tiny)")
    load_before = loadavg()
    result: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k != "out"}, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            result["models"][name] = measure_model(args, name, Path(tmp) / name)
    if not args.skip_layer:
        result["layer"] = layer_bench(args.rounds, args.layer_steps, quick=args.quick)
    result["machine"] = {"info": machine_info(), "loadavg_before": load_before, "loadavg_after": loadavg()}
    write_result(args.out, "adapter_bank", result, table)


if __name__ == "__main__":
    main()
